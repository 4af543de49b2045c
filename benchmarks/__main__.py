"""Runs the benchmark suite on the best device present and writes benchmarks/results/<device>.json.

    python -m benchmarks [--device cpu|cuda] [--quick] [--only drop_path,optim] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import traceback

import torch

from benchmarks.harness import environment, format_table

# Every benchmark module; the ones whose feature isn't in this checkout are skipped.
MODULES = ("drop_path", "attention", "optim", "reparameterize", "models")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", default="", help="comma-separated module names")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    selected = [m for m in MODULES if not args.only or m in args.only.split(",")]
    env = environment(args.device, args.quick)
    print(f"vitops benchmarks on {env['device']}: copy bandwidth {env['copy_bandwidth_gbps']} GB/s", flush=True)
    results, failures = {}, {}
    for name in selected:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ImportError as error:
            print(f"\n[{name}] skipped: {error}")
            continue
        try:
            rows = module.run(args.device, args.quick)
        except Exception:  # report and go on: one broken benchmark should not hide the others
            failures[name] = traceback.format_exc()
            print(f"\n[{name}] FAILED\n{failures[name]}", file=sys.stderr)
            continue
        results[name] = rows
        print(f"\n[{name}]\n{format_table(rows)}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    path = os.path.join(args.out, f"{slug}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "results": results, "failures": failures}, f, indent=1)
    print(f"\nwrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
