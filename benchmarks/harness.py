"""Timing, bandwidth and reporting shared by every benchmark module.

Each module in this package exposes `run(device: str, quick: bool) -> list[dict]`. A row names the op, the case,
the provider (vitops backend or baseline) and the mode, and gives the median time in ms plus whichever of GB/s,
TFLOP/s and percent of speed-of-light apply. Speed-of-light is the larger of FLOPs at the peak rate and bytes at
the bandwidth of a plain copy measured in the same run.
"""
from __future__ import annotations

import functools
import platform
import statistics
import time
from typing import Callable

import torch

# Dense bf16/fp16 tensor-core peak of the GPUs we report against, in TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def measure_ms(fn: Callable[[], object], device: str, quick: bool = False) -> float:
    """Median milliseconds per call: CUDA events on the GPU (triton's do_bench, which also flushes the L2 between
    runs), repeated wall-clock runs on the CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200, return_mode="median"))
    fn()  # warm-up
    budget_s = 0.3 if quick else 1.0
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure_ms_interleaved(fns: dict[str, Callable[[], object]], device: str, quick: bool = False) -> dict[str, float]:
    """measure_ms for several implementations of the same thing. On the CPU they take turns, one call each per
    round, so that a slow spell of a shared machine hits them all alike and their ratios hold; on the GPU each
    is timed on its own (CUDA events are not disturbed that way)."""
    if device == "cuda":
        return {name: measure_ms(fn, device, quick) for name, fn in fns.items()}
    for fn in fns.values():  # warm-up
        fn()
    budget_s = (0.3 if quick else 1.0) * len(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < budget_s and rounds < 200):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device: str, quick: bool = False) -> float:
    """Bytes read plus bytes written per second by a plain device-to-device copy, the practical memory roofline."""
    numel = (256 if device == "cuda" else 32) * 2**20 // 4
    if quick and device != "cuda":
        numel //= 2
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def row(
    *,
    op: str,
    case: str,
    provider: str,
    mode: str,
    ms: float,
    device: str,
    quick: bool = False,
    bytes_moved: float | None = None,
    flops: float | None = None,
    **extra,
) -> dict:
    """A result row with GB/s, TFLOP/s and percent of speed-of-light derived from the minimal bytes and FLOPs."""
    out = {"op": op, "case": case, "provider": provider, "mode": mode, "ms": round(ms, 4)}
    sol_s = 0.0
    if bytes_moved:
        out["gbps"] = round(bytes_moved / (ms * 1e-3) / 1e9, 2)
        sol_s = max(sol_s, bytes_moved / (copy_bandwidth_gbps(device, quick) * 1e9))
    if flops:
        out["tflops"] = round(flops / (ms * 1e-3) / 1e12, 2)
        peak = peak_tflops(device)
        if peak:
            sol_s = max(sol_s, flops / (peak * 1e12))
    if sol_s:
        out["pct_sol"] = round(100 * sol_s / (ms * 1e-3), 1)
    out.update(extra)
    return out


def add_speedups(rows: list[dict], baseline: str) -> None:
    """Adds `speedup` (baseline time / this time) to every row that has a baseline row with the same op, case
    and mode."""
    base = {(r["op"], r["case"], r["mode"]): r["ms"] for r in rows if r["provider"] == baseline}
    for r in rows:
        key = (r["op"], r["case"], r["mode"])
        if key in base:
            r["speedup_vs_" + baseline.replace(" ", "_").replace("(", "").replace(")", "")] = round(base[key] / r["ms"], 2)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


def environment(device: str, quick: bool) -> dict:
    import vitops

    return {
        "device": device_name(device),
        "device_type": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "vitops": vitops.__version__,
        "copy_bandwidth_gbps": round(copy_bandwidth_gbps(device, quick), 1),
        "peak_tflops": peak_tflops(device),
        "quick": quick,
    }
