#!/usr/bin/env python3
"""How steady this machine is: the CPU time of one fixed piece of work, repeated.

A virtual machine's core can run slower at one moment than the next (a
busy neighbour on the same physical core, the host's clock), and a thread's
CPU time then grows for the same work: no figure taken here shows it apart
from the change being measured. This times a fixed pure-Python loop (no
memory traffic, no system calls) ``--repeats`` times on each core in turn,
with nothing else of ours running, and prints the median, the fastest and
slowest, and the spread (slowest over fastest) per core. On a quiet machine
the spread stays within a few percent; a benchmark difference smaller than
the spread measured beside it needs more rounds, or another moment.

    .venv/bin/python benchmarks/machine_noise.py [--repeats 15] [--iterations 2000000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def fixed_work(iterations: int) -> float:
    """CPU seconds of this thread for ``iterations`` rounds of integer arithmetic."""
    start = time.thread_time()
    x = 0
    for i in range(iterations):
        x = (x * 31 + i) & 0xFFFF
    return time.thread_time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timings per core (default 15)")
    parser.add_argument("--iterations", type=int, default=2_000_000, help="loop rounds per timing (default 2,000,000)")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
    times: dict[int | None, list[float]] = {core: [] for core in cores}
    for _ in range(args.repeats):
        for core in cores:  # interleaved: a slow moment falls on every core alike
            if core is not None:
                os.sched_setaffinity(0, {core})
            times[core].append(fixed_work(args.iterations))
    print(f"{args.iterations:,} rounds of integer arithmetic, {args.repeats} timings per core, CPU ms:")
    for core, got in times.items():
        ms = sorted(t * 1000 for t in got)
        spread = ms[-1] / ms[0] if ms[0] > 0 else float("inf")
        each = ", ".join(f"{t * 1000:.0f}" for t in got)
        name = "any core" if core is None else f"core {core}"
        print(
            f"- {name}: median {statistics.median(ms):.0f}, fastest {ms[0]:.0f}, slowest {ms[-1]:.0f},"
            f" spread {spread:.2f}x ({each})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
