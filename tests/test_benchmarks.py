"""The benchmark harness (benchmarks/): roofline predictions from the case data alone, the CPU timing that leaves
out calls which waited for a CPU (the "8 ms pattern"), and the speedup tables. No timing of real kernels."""
import itertools

import pytest
import torch

from benchmarks import harness, roofline


def test_predictions_cover_every_gpu_case_without_a_gpu():
    rows = roofline.predictions("h100")
    expected = {
        (case.op, case.name, mode)
        for name in roofline.SUITE
        for case in __import__(f"benchmarks.{name}", fromlist=["cases"]).cases("cuda", quick=False)
        for mode in case.modes
    }
    assert {(r["op"], r["case"], r["mode"]) for r in rows} == expected
    assert all(r["predicted_us"] > 0 and r["bound"] in ("compute", "memory") for r in rows)
    # ViT-B attention at N=577 does 4*B*H*N^2*D FLOPs forward: bound by compute at 989 TFLOP/s when backward is in
    vit_b = next(r for r in rows if r["case"] == "ViT-B N=577 B=64" and r["mode"] == "fwd+bwd")
    assert vit_b["flops"] == pytest.approx(3.5 * 4 * 64 * 12 * 577**2 * 64)
    assert vit_b["bound"] == "compute"
    assert vit_b["predicted_us"] == pytest.approx(vit_b["flops"] / 989e12 * 1e6, rel=1e-3)


def test_measured_bandwidth_replaces_the_nominal_one():
    nominal = {(r["case"], r["mode"]): r for r in roofline.predictions("h100") if r["op"] == "drop_path_add"}
    measured = roofline.predictions("h100", bandwidth_gbps=1675.0)  # half of 3.35 TB/s
    for r in (r for r in measured if r["op"] == "drop_path_add"):
        assert r["predicted_us"] == pytest.approx(2 * nominal[(r["case"], r["mode"])]["predicted_us"], rel=1e-3)


class _FakeClock:
    """perf_counter and run-queue readings under the test's control: two calls in three wait 8 ms for a CPU."""

    def __init__(self):
        self.now, self.run_queue_ns, self.calls = 0.0, 0, itertools.count()

    def perf_counter(self):
        return self.now

    def call(self, ms):
        if next(self.calls) % 3 != 0:
            self.now += 8e-3
            self.run_queue_ns += 8_000_000
        self.now += ms * 1e-3


def test_calls_that_waited_for_a_cpu_are_left_out(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    monkeypatch.setattr(harness.RUN_QUEUE, "read", lambda: clock.run_queue_ns)
    monkeypatch.setattr(harness.RUN_QUEUE, "available", True)
    timings = harness.measure({"fast": lambda: clock.call(1.0), "slow": lambda: clock.call(2.0)}, "cpu", quick=True)
    assert timings["fast"].median == pytest.approx(1.0)
    assert timings["slow"].median == pytest.approx(2.0)
    assert timings["fast"].waited > 0 and not timings["fast"].contended
    assert timings["fast"].n + timings["fast"].waited == timings["fast"].calls


def test_table_speedups_and_summary():
    case = harness.Case("op", "case A", ("fwd",), torch.float32, flops={"fwd": 0.0}, bytes={"fwd": 1e8})
    providers = [
        harness.Provider("mine", harness.VITOPS, "the fused kernel"),
        harness.Provider("eager", harness.BASELINE, "what users run"),
        harness.Provider("compiled", harness.BASELINE, "torch.compile"),
    ]
    table = harness.Table("op", "eager", "fwd", providers)
    ctx = harness.Context("cpu", True, bandwidth_gbps=100.0, peak_tflops=None)
    times = {"mine": 2.0, "eager": 6.0, "compiled": 3.0}
    table.add(ctx, case, "fwd", {p: harness.Timing.of([ms] * 5) for p, ms in times.items()})
    rows = {r["provider"]: r for r in table.finish().rows}
    assert rows["mine"]["speedup"] == pytest.approx(3.0) and rows["compiled"]["speedup"] == pytest.approx(2.0)
    assert rows["mine"]["pct_roofline"] == pytest.approx(50.0)  # 100 MB at 100 GB/s take 1 ms; this took 2 ms
    (line,) = table.summary()
    assert "mine 1.50x faster than the best baseline, compiled" in line and "eager 3.00x" in line
    assert "speedup vs eager" in table.render(gpu=False)
