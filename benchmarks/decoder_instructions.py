#!/usr/bin/env python3
"""What the broker's decoder costs per PUBLISH frame of a run: one read of N
frames from one publisher on one channel, fed to ``Decoder.for_broker(runs=True)``
(the first frame starts the run, ``Decoder._run`` checks every one after it).

- instructions per frame, from ``valgrind --tool=callgrind`` (when installed):
  the script fed ``--feeds`` + 100 times minus fed ``--feeds`` times, divided
  by 100 x N frames; the interpreter's start-up and imports cancel out, and the
  count is the same on a busy machine;
- nanoseconds per frame: the best of five timings of ``--feeds`` feeds.

    .venv/bin/python benchmarks/decoder_instructions.py [--payloads equal|varied] [--frames 600]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

from hpfeeds3.protocol import encode_publish
from hpfeeds3.protocol.codec import Decoder, PublishRun

sys.path.insert(0, str(Path(__file__).resolve().parent))
from socketless import callgrind_available

EXTRA_FEEDS = 100


def read_of(payloads: str, frames: int) -> bytes:
    """One read: ``frames`` PUBLISH frames of one ident and channel, payloads of
    80 bytes each (``equal``) or 40-400 bytes (``varied``, seeded)."""
    rng = random.Random(1)
    sizes = [80] * frames if payloads == "equal" else [rng.randint(40, 400) for _ in range(frames)]
    return b"".join(encode_publish(b"sensor-0001", b"dionaea.capture", b"x" * n) for n in sizes)


def feed(data: bytes, feeds: int) -> None:
    for _ in range(feeds):
        [run] = Decoder.for_broker(runs=True).feed(data)
        assert isinstance(run, PublishRun) and run.data is data


def instructions(args: argparse.Namespace) -> int:
    """Instructions of ``--feeds`` + EXTRA_FEEDS feeds minus ``--feeds``, under callgrind."""
    counts = []
    for feeds in (args.feeds, args.feeds + EXTRA_FEEDS):
        argv = [sys.executable, __file__, "--payloads", args.payloads, "--frames", str(args.frames)]
        argv += ["--feeds", str(feeds), "--feed-only"]
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        counts.append(int(next(line for line in out.splitlines() if "Collected" in line).split()[-1]))
    return counts[1] - counts[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--payloads", choices=("equal", "varied"), default="equal")
    p.add_argument("--frames", type=int, default=600, help="frames in the read (default: 600)")
    p.add_argument("--feeds", type=int, default=10, help="feeds timed, and under callgrind the base (default: 10)")
    p.add_argument("--no-callgrind", action="store_true", help="timing only")
    p.add_argument("--feed-only", action="store_true", help=argparse.SUPPRESS)  # the run under callgrind
    args = p.parse_args()
    data = read_of(args.payloads, args.frames)
    if args.feed_only:
        feed(data, args.feeds)
        return
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        feed(data, args.feeds)
        best = min(best, time.perf_counter() - start)
    what = f"{args.payloads} payloads, {args.frames} frames a read"
    print(f"{what}: {best / args.feeds / args.frames * 1e9:.0f} ns a frame")
    if not callgrind_available(args.no_callgrind):
        return
    per_frame = instructions(args) / (EXTRA_FEEDS * args.frames)
    print(f"{what}: {per_frame:,.0f} instructions a frame (callgrind)")


if __name__ == "__main__":
    main()
