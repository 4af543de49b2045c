"""Shows the "8 ms pattern" (benchmarks.harness.RunQueueClock) on this machine: how one busy program on another
core stretches a 2-thread torch op to whole scheduler ticks, and that the calls that did not wait in a run queue
still give the undisturbed time.

    python -m benchmarks.contention        (about 10 s; starts one busy-loop process of its own, and stops it)

For 1 and 2 torch threads, quiet and with the competitor: the median of all calls, the median run-queue wait per
call, and the median of the undisturbed calls (what the harness reports), for an add of two (B, 197, 384) float32
tensors at B=64 and B=32.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

from benchmarks.harness import RUN_QUEUE, waited_for_cpu

CALLS = 200


def _probe(threads: int, batch: int) -> str:
    torch.set_num_threads(threads)
    a = torch.randn(batch, 197, 384)
    b = torch.randn_like(a)
    for _ in range(5):
        torch.add(a, b)
    calls, waits = [], []
    for _ in range(CALLS):
        wait0 = RUN_QUEUE.read() or 0
        t0 = time.perf_counter()
        torch.add(a, b)
        calls.append((time.perf_counter() - t0) * 1e3)
        waits.append(((RUN_QUEUE.read() or 0) - wait0) / 1e6)
    undisturbed = [ms for ms, wait in zip(calls, waits) if not waited_for_cpu(ms, wait)]
    clean = f"{statistics.median(undisturbed):6.2f} ms ({len(undisturbed):3d} calls)" if undisturbed else "   none"
    return (f"{threads} thread(s), B={batch:<3d} median {statistics.median(calls):6.2f} ms, "
            f"median run-queue wait {statistics.median(waits):5.2f} ms, undisturbed median {clean}")  # fmt: skip


def main() -> None:
    if not RUN_QUEUE.available:
        sys.exit("needs Linux's /proc/self/task/*/schedstat")
    runs = [(threads, batch) for threads in (1, 2) for batch in (64, 32)]
    print("quiet (as quiet as the machine is now):")
    for run in runs:
        print("  " + _probe(*run))
    # its own session, like another user's program (the scheduler groups tasks by session: autogroup)
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        time.sleep(0.5)
        print("with one busy-loop process competing for the CPUs:")
        for run in runs:
            print("  " + _probe(*run))
    finally:
        competitor.kill()
        competitor.wait()


if __name__ == "__main__":
    main()
