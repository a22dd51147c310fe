#!/usr/bin/env python3
"""Where a broker's event loop spends a benchmark that is not CPU: its thread's
scheduler state sampled from /proc (Linux), with the kernel function it sleeps
in, and the kernel stack of each distinct uninterruptible sleep.

Run it beside a benchmark (``benchmarks/compare``, ``hpfeeds-bench``) with the
broker's process id: the loop is the process's main thread. ``R`` is running
(or runnable); ``S`` in ``do_epoll_wait`` is the loop with nothing to do; ``S``
in ``futex_do_wait`` is a wait for a lock (the interpreter's); ``D`` is the
kernel holding the thread (the stack says why: a descriptor table growing in
``accept()`` waited for ``synchronize_rcu``, see hpfeeds3/broker/fdtable.py).
Samples are counted over the longest stretch with no pause of ``--gap``
between running samples, so a benchmark's quiet start and end do not count.

    sudo .venv/bin/python benchmarks/loop_states.py PID [--seconds 10] [--interval 0.0002]

(The kernel stacks need root; the states do not.)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path


def sample(pid: int, seconds: float, interval: float) -> tuple[list[tuple[float, str, str]], collections.Counter[str]]:
    """(time, state, wait channel) samples of ``pid``'s main thread, and the kernel
    stacks seen in uninterruptible sleep (by count)."""
    samples: list[tuple[float, str, str]] = []
    stacks: collections.Counter[str] = collections.Counter()
    stat, wchan, stack = (Path(f"/proc/{pid}/{name}") for name in ("stat", "wchan", "stack"))
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            where = wchan.read_text().strip() if state != "R" else "-"
        except (OSError, IndexError):
            break  # the process ended
        if state == "D":
            with contextlib.suppress(OSError):  # not root: states only
                stacks[stack.read_text()] += 1
        samples.append((now - start, state, where))
        time.sleep(interval)
    return samples, stacks


def busy_window(samples: list[tuple[float, str, str]], gap: float) -> tuple[float, float] | None:
    """From the first to the last running sample of the longest stretch whose
    running samples are at most ``gap`` apart."""
    best: tuple[float, float] | None = None
    lo = hi = None
    for t, state, _ in samples:
        if state != "R":
            continue
        if lo is None or hi is None or t - hi > gap:
            lo = hi = t
        else:
            hi = t
        if best is None or hi - lo > best[1] - best[0]:
            best = (lo, hi)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int, help="the broker's process id")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to sample (or until it ends)")
    parser.add_argument("--interval", type=float, default=0.0002, help="seconds between samples")
    parser.add_argument("--gap", type=float, default=0.5, help="the busy stretch ends at a pause this long")
    args = parser.parse_args(argv)
    if not Path(f"/proc/{args.pid}/stat").exists():
        parser.error(f"no process {args.pid} in /proc")
    samples, stacks = sample(args.pid, args.seconds, args.interval)
    window = busy_window(samples, args.gap)
    if window is None:
        print(f"{len(samples)} samples, none running")
        return 0
    lo, hi = window
    counts = collections.Counter((state, where) for t, state, where in samples if lo <= t <= hi)
    total = sum(counts.values())
    print(f"busy from {lo:.2f} s to {hi:.2f} s: {total} samples")
    for (state, where), n in counts.most_common(8):
        print(f"{n / total:7.1%}  {state} {where}")
    for text, n in stacks.most_common(2):
        print(f"\n{n} samples in uninterruptible sleep at:\n{text.rstrip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
