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

ITERATIONS = 2_000_000  # about 0.1 s of CPU on the project's machine when it is steady


def fixed_work(iterations: int) -> float:
    """CPU seconds of this thread for ``iterations`` rounds of integer arithmetic."""
    start = time.thread_time()
    x = 0
    for i in range(iterations):
        x = (x * 31 + i) & 0xFFFF
    return time.thread_time() - start


def time_each_core(repeats: int, iterations: int) -> dict[int | None, list[float]]:
    """CPU seconds of ``fixed_work(iterations)``, ``repeats`` times on each core in turn
    (interleaved: a slow moment falls on every core alike). The caller's affinity is
    restored after."""
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores: list[int | None] = [*sorted(before)] if before is not None else [None]
    times: dict[int | None, list[float]] = {core: [] for core in cores}
    try:
        for _ in range(repeats):
            for core in cores:
                if core is not None:
                    os.sched_setaffinity(0, {core})
                times[core].append(fixed_work(iterations))
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    return times


def _figures(got: list[float]) -> tuple[float, float, float, float]:
    """Median, fastest and slowest in CPU ms, and the spread (slowest over fastest)."""
    ms = sorted(t * 1000 for t in got)
    return statistics.median(ms), ms[0], ms[-1], (ms[-1] / ms[0] if ms[0] > 0 else float("inf"))


def _core_name(core: int | None) -> str:
    return "any core" if core is None else f"core {core}"


def summary(times: dict[int | None, list[float]]) -> list[str]:
    """One line a core: median, fastest, slowest and spread in CPU ms, and every timing."""
    lines = []
    for core, got in times.items():
        median, fastest, slowest, spread = _figures(got)
        each = ", ".join(f"{t * 1000:.0f}" for t in got)
        lines.append(
            f"{_core_name(core)}: median {median:.0f}, fastest {fastest:.0f}, slowest {slowest:.0f},"
            f" spread {spread:.2f}x ({each})"
        )
    return lines


def steadiness(repeats: int = 10, iterations: int = ITERATIONS) -> str:
    """The spread per core in one short line, for a benchmark's report (benchmarks/compare)."""
    parts = []
    for core, got in time_each_core(repeats, iterations).items():
        median, fastest, slowest, spread = _figures(got)
        parts.append(f"{_core_name(core)} {median:.0f} ms ({fastest:.0f} to {slowest:.0f}), spread {spread:.2f}x")
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timings per core (default 15)")
    parser.add_argument(
        "--iterations", type=int, default=ITERATIONS, help="loop rounds per timing (default %(default)s)"
    )
    args = parser.parse_args()
    times = time_each_core(args.repeats, args.iterations)
    print(f"{args.iterations:,} rounds of integer arithmetic, {args.repeats} timings per core, CPU ms:")
    for line in summary(times):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
