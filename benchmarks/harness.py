"""What every benchmark module shares: case descriptions, timing with its spread, tables, summaries, progress.

A module exposes
    cases(device, quick) -> list[Case]      what it measures, as data (shapes, dtype, FLOPs and minimal bytes per
                                            mode); benchmarks.roofline reads the same list without running anything
    run(ctx) -> list[Table]                 times those cases, one Table per op
Every table compares providers (vitops backends, the baselines users run today) with one convention: speedup vs
the table's baseline = baseline time / provider time, so bigger is faster.

Timing on the GPU: triton.testing.do_bench (CUDA events, L2 flushed between calls). On the CPU: wall-clock calls,
the providers of one comparison taking turns (one call each per round, the starting provider rotating), so a slow
spell of a shared machine hits them alike. Each CPU call also records how long this process's threads sat runnable
but without a CPU (Linux schedstat run_delay), and the median uses only the calls that did not wait: see
`RunQueueClock` for why (the "8 ms pattern").
"""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from benchmarks import roofline

# CPU time budget per provider and comparison, in seconds: at least MIN_ROUNDS rounds and MIN_CLEAN calls that
# did not wait for a CPU, stopping anyway after 3 budgets (or 6 budgets and 2 rounds, when other programs slow
# every call down) or MAX_ROUNDS rounds.
BUDGET_S = {False: 1.0, True: 0.25}
MIN_ROUNDS = {False: 5, True: 3}
MAX_ROUNDS = 200
MIN_CLEAN = 5
# A call "waited" when its threads spent longer than this runnable without a CPU. Waking an OpenMP worker always
# costs some microseconds of run-queue time, which is part of the op's cost on any machine; a scheduler tick
# (4 ms here) is not.
WAIT_FLOOR_MS = 0.2
WAIT_FRACTION = 0.05
# A timing whose p20-p80 range exceeds this share of its median is marked noisy.
NOISY_SPREAD = 0.2

# Provider roles. The summary line compares the best "vitops" provider with the best "baseline".
VITOPS = "vitops"  # a vitops backend (forced with vitops.use_backend), model or optimizer
BASELINE = "baseline"  # what users run today for the same result
YARDSTICK = "yardstick"  # does less or different work (e.g. AdamW beside LAMB): a point of comparison only
REFERENCE = "reference"  # vitops forced to its PyTorch-ops fallback: what the kernels buy

BACKEND_LABELS = {"cuda": "vitops CUDA", "triton": "vitops Triton", "cpu": "vitops C++", "torch": "vitops fallback"}
_BACKEND_WHAT = {
    "cuda": "its compiled CUDA kernel",
    "triton": "its Triton kernel",
    "cpu": "its compiled C++ kernel",
    "torch": "its fallback written with PyTorch ops, what runs where no vitops kernel can",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked problem. `flops` and `bytes` give, per mode, the matrix/convolution FLOPs (2 per
    multiply-add) and the least bytes any implementation must read and write; `spec` holds what the module needs
    to build the inputs (shapes, heads, batch...)."""

    op: str
    name: str
    modes: tuple[str, ...]
    dtype: torch.dtype
    flops: Mapping[str, float]
    bytes: Mapping[str, float]
    spec: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    role: str
    description: str


def vitops_providers(op: str, device: str, what: str, *, reference: bool = False) -> list[tuple[str, Provider]]:
    """(backend, Provider) for every vitops backend that can run `op` on `device`, kernels first, each forced
    with vitops.use_backend; the PyTorch-ops fallback ("torch") too when `reference` is set or when it is all
    there is. `what` names the public call being timed (e.g. "vitops.optim.Lamb.step")."""
    import vitops

    entry = vitops.backend_info()["ops"][op][device]
    runnable = [b for b in entry["order"] if b not in entry["unavailable"]]
    kernels = [b for b in runnable if b != "torch"]
    out = []
    for backend in kernels + (["torch"] if reference or not kernels else []):
        default = " (the default here)" if backend == entry["default"] else ""
        role = REFERENCE if backend == "torch" and kernels else VITOPS
        description = f"{what} on {_BACKEND_WHAT[backend]}, use_backend({backend!r}){default}"
        out.append((backend, Provider(BACKEND_LABELS[backend], role, description)))
    return out


# ---------------------------------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call. On the CPU the statistics cover the calls that did not wait for a CPU (`n` of
    `calls`), or all of them when fewer than MIN_CLEAN did (then `contended`)."""

    median: float
    min: float
    p20: float
    p80: float
    max: float
    n: int | None
    calls: int | None = None
    waited: int = 0
    contended: bool = False

    @property
    def noisy(self) -> bool:
        return self.contended or (self.p80 - self.p20) > NOISY_SPREAD * self.median

    def as_dict(self) -> dict:
        out = {k: round(getattr(self, k), 4) for k in ("min", "p20", "median", "p80", "max")}
        out.update(n=self.n, calls=self.calls, waited_for_cpu=self.waited, contended=self.contended, noisy=self.noisy)
        return out

    @classmethod
    def of(cls, times: list[float], **kwargs) -> Timing:
        levels = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
        low, p20, median, p80, high = torch.tensor(times, dtype=torch.float64).quantile(levels).tolist()
        return cls(median, low, p20, p80, high, len(times), **kwargs)


class RunQueueClock:
    """Total nanoseconds this process's threads have been runnable but waiting for a CPU: the second field of
    /proc/self/task/*/schedstat (Linux, CONFIG_SCHED_INFO); `available` is False elsewhere.

    Why the CPU harness needs it, the "8 ms pattern": timed on this shared 2-core VM, many medians sat on
    multiples of 8 ms, and half the batch took the same 7.99 ms. An op on torch's 2 threads is an OpenMP parallel
    region that ends when both halves are done. When another program holds the second core, the woken worker
    waits in that core's run queue until the scheduler preempts the other program, which it does on a timer tick
    (CONFIG_HZ=250 here: every 4 ms); meanwhile the first thread spins at the barrier, keeping its own core busy.
    Measured (scratch script, one busy-loop competitor in another session): a 2-thread add of two 19 MB tensors
    took 1.0 ms undisturbed and 7.7 ms median with the competitor, half the batch 0.4 ms and 7.65 ms, and the
    median run-queue wait per call was 8.00 ms, i.e. two ticks, in both; with one thread the same competitor cost
    some calls one tick (3.99 ms) and left the median alone; OMP_WAIT_POLICY=PASSIVE cut the median wait to 5.2
    ms without removing it; at a load average of 8 the medians were 20-24 ms (5-6 ticks) for a 0.8 ms op. No
    cgroup CPU quota is involved (cpu.cfs_quota_us is -1) and the VM reported no steal time. Interleaving keeps
    ratios fair only while such waits are rarer than the calls; once most calls wait, every provider's median
    becomes the wait. So each call's run-queue wait is read, and calls that waited are left out of the
    statistics (and counted: a table warns when the machine was busy)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self.available = sys.platform.startswith("linux") and os.path.exists(f"/proc/self/task/{os.getpid()}/schedstat")

    def read(self) -> int | None:
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return None
        total = 0
        for tid in tids:
            fd = self._fds.get(tid)
            try:
                if fd is None:
                    fd = self._fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                total += int(os.pread(fd, 128, 0).split()[1])
            except (OSError, IndexError, ValueError):  # the thread has exited, or no schedstat
                if tid in self._fds:
                    os.close(self._fds.pop(tid))
        return total


RUN_QUEUE = RunQueueClock()


def waited_for_cpu(call_ms: float, run_queue_ms: float) -> bool:
    """Whether a call's threads sat in a run queue long enough to count as disturbed by another program."""
    return run_queue_ms > max(WAIT_FLOOR_MS, WAIT_FRACTION * call_ms)


def _measure_cpu(fns: dict[str, Callable[[], object]], quick: bool) -> dict[str, Timing]:
    names = list(fns)
    for fn in fns.values():  # warm-up: allocations, lazy initialisation, compilation
        fn()
    budget = BUDGET_S[quick] * len(names)
    samples: dict[str, list[tuple[float, bool]]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while True:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            wait0 = RUN_QUEUE.read() if RUN_QUEUE.available else 0
            t0 = time.perf_counter()
            fns[name]()
            ms = (time.perf_counter() - t0) * 1e3
            wait_ms = ((RUN_QUEUE.read() or 0) - wait0) / 1e6 if RUN_QUEUE.available else 0.0
            samples[name].append((ms, waited_for_cpu(ms, wait_ms)))
        rounds += 1
        elapsed = time.perf_counter() - start
        clean_enough = all(sum(not waited for _, waited in s) >= MIN_CLEAN for s in samples.values())
        enough_rounds = rounds >= MIN_ROUNDS[quick]
        if (rounds >= MAX_ROUNDS or (enough_rounds and (elapsed >= 3 * budget or (elapsed >= budget and clean_enough)))
                or (rounds >= 2 and elapsed >= 6 * budget)):
            break
    out = {}
    for name, s in samples.items():
        clean = [ms for ms, waited in s if not waited]
        contended = len(clean) < min(MIN_CLEAN, len(s))
        kept = [ms for ms, _ in s] if contended else clean
        out[name] = Timing.of(kept, calls=len(s), waited=len(s) - len(clean), contended=contended)
    return out


def _measure_cuda(fn: Callable[[], object], quick: bool) -> Timing:
    import triton.testing

    kwargs = {"warmup": 10 if quick else 25, "rep": 50 if quick else 200}
    try:
        return Timing.of([float(t) for t in triton.testing.do_bench(fn, return_mode="all", **kwargs)])
    except AssertionError:  # a triton without return_mode="all": its quantiles, count unknown
        q = triton.testing.do_bench(fn, quantiles=[0.0, 0.2, 0.5, 0.8, 1.0], **kwargs)
        return Timing(q[2], q[0], q[1], q[3], q[4], None)


def measure(fns: dict[str, Callable[[], object]], device: str, quick: bool) -> dict[str, Timing]:
    """A Timing for each of several implementations of the same computation: on the GPU each on its own (CUDA
    events are not disturbed by other programs), on the CPU in turns."""
    if device == "cuda":
        return {name: _measure_cuda(fn, quick) for name, fn in fns.items()}
    return _measure_cpu(fns, quick)


def copy_bandwidth_gbps(device: str, quick: bool) -> float:
    """Bytes read plus bytes written per second by a plain device copy, the practical memory roofline. Each
    buffer (256 MiB) is several times the CPU's last-level cache or the GPU's L2."""
    numel = 256 * 2**20 // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure({"copy": lambda: dst.copy_(src)}, device, quick)["copy"]
    return 2 * src.numel() * src.element_size() / (timing.median * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------- context


class Progress:
    """One line per timed (case, mode) on stderr: how far the suite is, which benchmark and case."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, module: str, what: str) -> None:
        self.done += 1
        elapsed = int(time.perf_counter() - self.start)
        print(f"  [{self.done}/{self.total}, {elapsed // 60}:{elapsed % 60:02d}] {module}: {what}",
              file=sys.stderr, flush=True)  # fmt: skip


@dataclasses.dataclass
class Context:
    device: str
    quick: bool
    bandwidth_gbps: float
    peak_tflops: float | None
    progress: Progress | None = None

    def step(self, module: str, what: str) -> None:
        if self.progress is not None:
            self.progress.step(module, what)


def make_context(device: str, quick: bool, progress: Progress | None = None) -> Context:
    gpu = roofline.gpu_for_device_name(torch.cuda.get_device_name()) if device == "cuda" else None
    return Context(device, quick, copy_bandwidth_gbps(device, quick), gpu.dense_tflops if gpu else None, progress)


# ---------------------------------------------------------------------------------------------------- tables


class Table:
    """The timings of one op: providers as columns, (case, mode) as rows, speedups vs `baseline`."""

    def __init__(self, op: str, baseline: str, headline_mode: str, providers: list[Provider], about: str = ""):
        self.op, self.baseline, self.headline_mode, self.about = op, baseline, headline_mode, about
        self.providers = {p.name: p for p in providers}
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def add(self, ctx: Context, case: Case, mode: str, timings: Mapping[str, Timing]) -> None:
        for provider, timing in timings.items():
            row = {"op": self.op, "case": case.name, "mode": mode, "provider": provider, "ms": round(timing.median, 4),
                   "spread_ms": timing.as_dict()}  # fmt: skip
            seconds = timing.median * 1e-3
            if case.bytes.get(mode):
                row["gbps"] = round(case.bytes[mode] / seconds / 1e9, 2)
            if case.flops.get(mode):
                row["tflops"] = round(case.flops[mode] / seconds / 1e12, 3)
            if case.bytes.get(mode) or case.flops.get(mode):
                least_s, limit = roofline.bound(case.flops.get(mode, 0.0), case.bytes.get(mode, 0.0),
                                                ctx.peak_tflops, ctx.bandwidth_gbps)  # fmt: skip
                row.update(roofline_us=round(least_s * 1e6, 3), bound=limit,
                           pct_roofline=round(100 * least_s / seconds, 1))  # fmt: skip
            self.rows.append(row)

    def skip(self, provider: str, reason: str, case: str | None = None) -> None:
        where = f" for {case}" if case else ""
        self.notes.append(f"{provider} skipped{where}: {reason}")

    def _speedups(self) -> dict[tuple[str, str], dict[str, float]]:
        by_key: dict[tuple[str, str], dict[str, dict]] = {}
        for r in self.rows:
            by_key.setdefault((r["case"], r["mode"]), {})[r["provider"]] = r
        out = {}
        for key, rows in by_key.items():
            base = rows.get(self.baseline)
            out[key] = {p: base["ms"] / r["ms"] for p, r in rows.items()} if base else {}
        return out

    def finish(self) -> Table:
        """Adds `speedup` (vs the baseline) to every row whose (case, mode) has a baseline timing."""
        speedups = self._speedups()
        for r in self.rows:
            s = speedups[(r["case"], r["mode"])].get(r["provider"])
            if s is not None:
                r["speedup"] = round(s, 3)
        return self

    def _columns(self) -> list[str]:
        present = {r["provider"] for r in self.rows}
        order = {VITOPS: 1, BASELINE: 2, YARDSTICK: 3, REFERENCE: 4}
        ranked = sorted((p for p in self.providers.values() if p.name in present and p.name != self.baseline),
                        key=lambda p: order[p.role])  # fmt: skip
        return ([self.baseline] if self.baseline in present else []) + [p.name for p in ranked]

    def render(self, gpu: bool) -> str:
        columns = self._columns()
        keys = list(dict.fromkeys((r["case"], r["mode"]) for r in self.rows))
        cell: dict[tuple[str, str, str], str] = {}
        for r in self.rows:
            mark = "~" if r["spread_ms"]["noisy"] else ""
            text = _format_ms(r["ms"]) if r["provider"] == self.baseline else f"{r.get('speedup', 0):.2f}x"
            if gpu and "pct_roofline" in r:
                text += f" {r['pct_roofline']:.0f}%"
            cell[(r["case"], r["mode"], r["provider"])] = text + mark
        case_w = max(len("case"), *(len(c) for c, _ in keys))
        mode_w = max(len("mode"), *(len(m) for _, m in keys))
        widths = [max(len(c), *(len(cell.get((k[0], k[1], c), "-")) for k in keys)) for c in columns]
        lines = [f"== {self.op} ==" + (f"  {self.about}" if self.about else "")]
        lines.append(wrap(f"speedup vs {self.baseline} = its time / the provider's time (bigger is faster); "
                          f"the {self.baseline} column: its median time"))  # fmt: skip
        if gpu:
            lines.append("NN% = the share of the roofline reached (least possible time / time, benchmarks/roofline.py)")
        header = f"{'case':<{case_w}}  {'mode':<{mode_w}}"
        lines.append(header + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths)))
        last_case = None
        for case, mode in keys:
            shown = case if case != last_case else ""
            last_case = case
            cells = "".join(f"  {cell.get((case, mode, c), '-'):>{w}}" for c, w in zip(columns, widths))
            lines.append(f"{shown:<{case_w}}  {mode:<{mode_w}}" + cells)
        table_end = len(lines)
        lines.append("providers:")
        name_w = max(len(c) for c in columns)
        for c in columns:
            p = self.providers[c]
            lines.append(f"  {c:<{name_w}}  [{p.role}] {p.description}")
        lines += [f"note: {n}" for n in self.notes]
        calls = sum(r["spread_ms"]["calls"] or 0 for r in self.rows)
        waited = sum(r["spread_ms"]["waited_for_cpu"] for r in self.rows)
        if any(r["spread_ms"]["noisy"] for r in self.rows):
            lines.append(f"~ noisy: p20-p80 spread above {NOISY_SPREAD:.0%} of the median, or most calls waited "
                         "for a CPU (spread in the JSON)")  # fmt: skip
        if calls and waited > 0.1 * calls:
            contended = sum(r["spread_ms"]["contended"] for r in self.rows)
            lines.append(f"WARNING: the machine was busy: {waited} of {calls} timed calls waited for a CPU held by "
                         "another program. Medians leave those calls out (benchmarks/harness.py)"
                         + (f", except in {contended} timings where fewer than {MIN_CLEAN} calls ran undisturbed: "
                            "those include the waits, and their ratios mean little" if contended else ""))  # fmt: skip
        lines += ["summary:"] + [f"  {s}" for s in self.summary()]
        return "\n".join(lines[:table_end] + [wrap(line) for line in lines[table_end:]])

    def summary(self) -> list[str]:
        """Per case, at the headline mode: the best vitops provider against the best baseline and each one."""
        out = []
        speedups = self._speedups()
        cases = list(dict.fromkeys(r["case"] for r in self.rows))
        for case in cases:
            modes = [m for c, m in speedups if c == case]
            mode = self.headline_mode if self.headline_mode in modes else modes[-1]
            s = speedups[(case, mode)]
            rows = {r["provider"]: r for r in self.rows if (r["case"], r["mode"]) == (case, mode)}
            mine = [p for p in s if self.providers[p].role == VITOPS]
            bases = [p for p in s if self.providers[p].role == BASELINE]
            if not mine or not bases:
                continue
            best = max(mine, key=s.get)
            best_base = max(bases, key=s.get)
            ratio = s[best] / s[best_base]
            if abs(ratio - 1) < 0.03:
                verdict = f"on par with the best baseline, {best_base} ({ratio:.2f}x)"
            elif ratio > 1:
                verdict = f"{ratio:.2f}x faster than the best baseline, {best_base}"
            else:
                verdict = f"{1 / ratio:.2f}x SLOWER than the best baseline, {best_base}"
            each = ", ".join(f"{b} {s[best] / s[b]:.2f}x" for b in bases)
            yard = [p for p in s if self.providers[p].role == YARDSTICK]
            yards = "".join(f"; vs yardstick {y}: {s[best] / s[y]:.2f}x" for y in yard)
            noisy = rows[best]["spread_ms"]["noisy"] or rows[best_base]["spread_ms"]["noisy"]
            out.append(f"{self.op} {mode}, {case}: {best} {verdict} (vs {each}{yards})" + (" (noisy)" if noisy else ""))
        return out

    def as_dict(self) -> dict:
        return {
            "op": self.op,
            "about": self.about,
            "baseline": self.baseline,
            "headline_mode": self.headline_mode,
            "providers": {name: {"role": p.role, "description": p.description} for name, p in self.providers.items()},
            "rows": self.rows,
            "notes": self.notes,
            "summary": self.summary(),
        }


# ---------------------------------------------------------------------------------------------------- helpers


def wrap(line: str, width: int = 118) -> str:
    """A long prose line folded to `width`, continuation lines indented under its first word."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False)


def _format_ms(ms: float) -> str:
    return f"{ms:.{0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3}f} ms"


def model_flops(make_model: Callable[[], torch.nn.Module], input_shape: tuple[int, ...], train: bool) -> float:
    """Matrix/convolution FLOPs of one forward (and backward, when `train`) of the model on `input_shape`,
    counted by torch.utils.flop_counter on the meta device: no kernel runs and no memory is allocated."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = make_model().train(train)
        x = torch.empty(input_shape)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if train:
            out.float().sum().backward()
    return float(counter.get_total_flops())


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


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001  (an optional dependency that is missing or broken)
        return None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                check=False)  # fmt: skip
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: above the core count, other programs were competing for CPUs."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(ctx: Context) -> dict:
    return {
        "device": device_name(ctx.device),
        "device_type": ctx.device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "versions": {m: _version(m) for m in ("vitops", "torch", "triton", "timm", "numpy")}
        | {"python": platform.python_version(), "cuda": torch.version.cuda},
        "git_commit": _git_commit(),
        "copy_bandwidth_gbps": round(ctx.bandwidth_gbps, 1),
        "peak_tflops": ctx.peak_tflops,
        "quick": ctx.quick,
        "timing": "interleaved wall clock, calls that waited for a CPU left out" if ctx.device == "cpu"
        else "triton.testing.do_bench",
    }  # fmt: skip
