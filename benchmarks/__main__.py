"""Runs the benchmark suite on the best device present, prints one table per op, and writes the results as JSON.

    python -m benchmarks [--device cpu|cuda] [--quick] [--threads N] [--only drop_path,optim] [--save | --out DIR]
                         [--plot]

Without --save the JSON goes to .bench/ (git-ignored): a run never leaves an untracked file in the source tree.
--save writes benchmarks/results/<device>.json (<device>-quick.json for --quick), the files the README quotes.
--plot also writes a PNG bar chart of the speedups beside the JSON (needs matplotlib).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
import traceback

import torch

from benchmarks import harness, roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SCRATCH = os.path.join(ROOT, ".bench")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer cases and shorter timing (about 3 minutes)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice, one per core); "
                        "part of the results file's name")  # fmt: skip
    parser.add_argument("--only", default="", help=f"comma-separated modules, of: {','.join(roofline.SUITE)}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--save", action="store_true", help=f"write the JSON to {os.path.relpath(RESULTS, ROOT)}/")
    where.add_argument("--out", help=f"write the JSON to this folder (default {os.path.relpath(SCRATCH, ROOT)}/)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG chart of the speedups (matplotlib)")
    args = parser.parse_args()
    unknown = set(filter(None, args.only.split(","))) - set(roofline.SUITE)
    if unknown:
        parser.error(f"--only: unknown module(s) {', '.join(sorted(unknown))}; choose from {', '.join(roofline.SUITE)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed: pip install matplotlib")
    return args


def _write(path: str, env: dict, tables: list[harness.Table], failures: dict, started: float) -> dict:
    env = env | {"load_average_after": harness.load_average(), "elapsed_s": round(time.perf_counter() - started)}
    results = {"environment": env, "tables": [t.as_dict() for t in tables], "failures": failures}
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    return results


def main() -> int:
    args = _arguments()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in roofline.SUITE if not args.only or m in args.only.split(",")]
    modules, failures = {}, {}
    for name in names:
        try:
            modules[name] = importlib.import_module(f"benchmarks.{name}")
        except ImportError as error:  # a dependency missing, or the op layer mid-change
            failures[name] = f"not run: {error}"
            print(f"[{name}] not run: {error}", file=sys.stderr)
    steps = sum(len(case.modes) for m in modules.values() for case in m.cases(args.device, args.quick))
    ctx = harness.make_context(args.device, args.quick, harness.Progress(steps))
    env = harness.environment(ctx)
    print(f"vitops benchmarks on {env['device']}, torch {env['versions']['torch']}, "
          f"copy bandwidth {env['copy_bandwidth_gbps']} GB/s, load average {env['load_average']}"
          f"{', quick' if args.quick else ''}: {len(modules)} modules, {steps} timed case/mode pairs",
          flush=True)  # fmt: skip
    load = env["load_average"]
    if args.device == "cpu" and load and load[0] > (os.cpu_count() or 1):
        print(f"WARNING: load average {load[0]} on {os.cpu_count()} CPUs: other programs are running, and every "
              "parallel region of an op may wait a scheduler tick for its second thread (benchmarks/harness.py); "
              "the tables flag what that spoiled", file=sys.stderr, flush=True)  # fmt: skip
    out_dir = RESULTS if args.save else (args.out or SCRATCH)
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower() + ("-quick" if args.quick else "")
    path = os.path.join(out_dir, f"{slug}.json")
    tables: list[harness.Table] = []
    for name, module in modules.items():
        try:
            module_tables = module.run(ctx)
        except Exception:  # noqa: BLE001  (report and go on: one broken benchmark should not hide the others)
            failures[name] = traceback.format_exc()
            print(f"\n[{name}] FAILED\n{failures[name]}", file=sys.stderr, flush=True)
            continue
        for table in module_tables:
            print("\n" + table.render(gpu=args.device == "cuda"), flush=True)
        tables += module_tables
        # after each module, so that a run cut short (a time limit on a lent GPU) keeps what it measured
        _write(path, env, tables, failures, started)
    results = _write(path, env, tables, failures, started)
    print("\nsummary:")
    for table in tables:
        for line in table.summary():
            print(harness.wrap(f"  {line}"))
    print(f"\nwrote {os.path.relpath(path)} ({results['environment']['elapsed_s']} s)")
    if args.plot:
        from benchmarks.plot import plot

        print(f"wrote {os.path.relpath(plot(results, path.removesuffix('.json') + '.png'))}")
    if failures:
        print(f"failed or not run: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
