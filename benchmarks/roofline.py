"""Roofline predictions: the least time each GPU benchmark row can take, from its FLOPs and minimal bytes alone.

    predictions(gpu="h100", bandwidth_gbps=None) -> one dict per (op, case, mode) of the full GPU suite

Nothing runs on a device: every benchmark module describes its cases as data (`cases(device, quick)`, a list of
`benchmarks.harness.Case` with the shapes, dtype, FLOPs and minimal bytes of each mode), and the same cases drive
the timed run, whose tables give "% of roofline" per row (`benchmarks.harness`). The bound is the larger of
FLOPs at the dense bf16/fp16 tensor-core peak and minimal bytes at the memory bandwidth: the nominal HBM figure
here, or the copy bandwidth a GPU run measured when passed as `bandwidth_gbps`. FLOPs count matrix products and
convolutions only (2 per multiply-add); element-wise work is free at this level, so memory-bound rows are bound by
bytes alone.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    dense_tflops: float  # bf16/fp16 tensor cores, dense
    memory_gbps: float  # nominal HBM bandwidth


GPUS = {
    "h100": Gpu("NVIDIA H100 SXM (HBM3)", 989.0, 3350.0),
    "h200": Gpu("NVIDIA H200 (HBM3e)", 989.0, 4800.0),
    "a100": Gpu("NVIDIA A100 SXM 80GB (HBM2e)", 312.0, 2039.0),
}

# The modules whose cases make up the GPU suite, in the order `python -m benchmarks` runs them.
SUITE = ("drop_path", "attention", "optim", "reparameterize", "models")


def gpu_for_device_name(device_name: str) -> Gpu | None:
    """The GPU table entry for a torch.cuda.get_device_name() string, if it is one we know."""
    upper = device_name.upper()
    return next((gpu for key, gpu in GPUS.items() if key.upper() in upper), None)


def bound(flops: float, bytes_moved: float, peak_tflops: float | None, bandwidth_gbps: float) -> tuple[float, str]:
    """(least seconds, "compute" or "memory"): the larger of FLOPs at the peak and bytes at the bandwidth.
    Without a FLOP peak (a CPU) only the bytes count."""
    memory_s = bytes_moved / (bandwidth_gbps * 1e9)
    compute_s = flops / (peak_tflops * 1e12) if peak_tflops else 0.0
    return (compute_s, "compute") if compute_s > memory_s else (memory_s, "memory")


def predictions(gpu: str = "h100", bandwidth_gbps: float | None = None) -> list[dict]:
    """One dict per row of the full GPU suite: op, case, mode, dtype, flops, min_bytes, predicted_us (the least
    time), bound ("compute" or "memory"), and the peak and bandwidth used. `bandwidth_gbps` (read + write bytes per
    second of a device copy, as `python -m benchmarks` measures it) replaces the nominal HBM figure."""
    spec = GPUS[gpu.lower()]
    bandwidth = bandwidth_gbps or spec.memory_gbps
    rows = []
    for name in SUITE:
        module = importlib.import_module(f"benchmarks.{name}")
        for case in module.cases("cuda", quick=False):
            for mode in case.modes:
                seconds, limit = bound(case.flops[mode], case.bytes[mode], spec.dense_tflops, bandwidth)
                rows.append({
                    "op": case.op, "case": case.name, "mode": mode, "dtype": str(case.dtype).removeprefix("torch."),
                    "flops": case.flops[mode], "min_bytes": case.bytes[mode],
                    "predicted_us": round(seconds * 1e6, 3), "bound": limit,
                    "peak_tflops": spec.dense_tflops, "bandwidth_gbps": bandwidth, "gpu": spec.name,
                })  # fmt: skip
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--bandwidth-gbps", type=float, default=None, help="a measured copy bandwidth")
    args = parser.parse_args()
    for r in predictions(args.gpu, args.bandwidth_gbps):
        print(f"{r['op']:<16} {r['case']:<28} {r['mode']:<8} {r['predicted_us']:>12.1f} us  {r['bound']}")
