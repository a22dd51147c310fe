#!/usr/bin/env python3
"""What a durable subscriber adds to each message, in instructions and in
simulated cache misses, apart from the kernel and the machine's moods.

One publisher sends reads of ``--frames`` PUBLISH frames (``--payload``
bytes each) on one channel; one subscriber, key ``dur``, reads it, durable
(fed from the log) or not (the router's subscriber). Both are driven straight
through a running broker's ``Connection`` objects, in its process, on
transports that only count what is written (no socket): the real router,
durable log (writer thread, files in a temporary data directory) and feed.
Each read is a fresh ``bytes`` copied out of one receive buffer, as uvloop
hands a read over.

Figures, per message, for ``plain`` and ``durable``:

- under ``valgrind --tool=callgrind --cache-sim=yes`` (when installed): the
  instructions, and the first-level data cache's and a last-level cache's
  read and write misses, the last level simulated as ``--ll`` (default 512
  KiB, 8 ways: this machine's second-level cache a core); ``2 x --reads``
  reads minus ``--reads``, so start-up cancels out. The kernel's work (its
  copies to sockets and files) is not in these counts;
- the CPU time of the process (every thread), median and range over
  ``--rounds`` interleaved: it moves with the machine.

    .venv/bin/python benchmarks/durable_instructions.py [--reads 200] [--frames 500] [--rounds 5] [--no-callgrind]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from hpfeeds3.protocol import encode_auth, encode_publish, encode_subscribe, sign

sys.path.insert(0, str(Path(__file__).resolve().parent))
from socketless import Transport, callgrind_available

VARIANTS = ("plain", "durable")
EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
SHOWN = (("Ir", "instructions"), ("D1mr", "L1 read misses"), ("D1mw", "L1 write misses"),
         ("DLmr", "LL read misses"), ("DLmw", "LL write misses"))  # fmt: skip
SETTLE_S = 0.05
DELIVERY_WAIT_S = 60.0  # most to wait for the subscriber to have every message


def run_broker(variant_plan: list[str], reads: int, frames: int, payload: int) -> list[tuple[str, float]]:
    """A broker in this process, one fresh broker per entry of ``variant_plan``; returns
    (variant, CPU seconds of the process from the first read until the last message was written
    to the subscriber)."""
    import uvloop

    from hpfeeds3.broker.cli import build_parser, config_from_args, configure_logging
    from hpfeeds3.broker.connection import Connection
    from hpfeeds3.broker.logs import stop_logging
    from hpfeeds3.broker.server import serve

    run = b"".join(encode_publish(b"pub", b"bench", b"x" * payload) for _ in range(frames))
    receive_buffer = memoryview(bytearray(run))
    results: list[tuple[str, float]] = []
    configure_logging("text", False)
    try:
        for variant in variant_plan:
            with tempfile.TemporaryDirectory(prefix="hpfeeds-di-") as tmp:
                users = {
                    "pub": {"owner": "pub", "secret": "pub", "pubchans": ["bench"], "subchans": []},
                    "dur": {
                        "owner": "dur", "secret": "dur", "pubchans": [], "subchans": ["bench"],
                        "durable": variant == "durable",
                    },
                }  # fmt: skip
                Path(tmp, "keys.json").write_text(json.dumps(users))
                argv = ["--bind", "127.0.0.1:0", "--auth", f"{tmp}/keys.json", "--data-dir", f"{tmp}/data"]
                config = config_from_args(build_parser().parse_args(argv))

                async def main(variant: str = variant, config: Any = config) -> None:
                    stop = asyncio.Event()

                    def started(broker: Any) -> None:
                        async def go() -> None:
                            try:
                                sub_t, pub_t = Transport("127.0.0.2", 40002), Transport("127.0.0.3", 40003)
                                sub_tr, pub_tr = cast(Any, sub_t), cast(Any, pub_t)  # (no socket)
                                sub, pub = Connection(broker), Connection(broker)
                                sub.connection_made(sub_tr)
                                pub.connection_made(pub_tr)
                                sub_auth = encode_auth(b"dur", sign(sub_t.first[-4:], b"dur"))
                                sub.data_received(sub_auth + encode_subscribe(b"dur", b"bench"))
                                pub.data_received(encode_auth(b"pub", sign(pub_t.first[-4:], b"pub")))
                                await asyncio.sleep(SETTLE_S)
                                if (sub.feed is not None) != (variant == "durable"):
                                    raise SystemExit(f"{variant}: the subscriber is not fed as it should be")
                                want = sub_t.written + reads * len(run)
                                start = time.process_time()
                                for _ in range(reads):
                                    pub.data_received(bytes(receive_buffer))  # a fresh read, as uvloop's
                                    await asyncio.sleep(0)
                                deadline = time.monotonic() + DELIVERY_WAIT_S
                                while sub_t.written < want:
                                    if time.monotonic() > deadline:
                                        raise SystemExit(f"{variant}: {want - sub_t.written} bytes never delivered")
                                    await asyncio.sleep(0.0005)
                                results.append((variant, time.process_time() - start))
                            finally:
                                stop.set()

                        broker.spawn(go())

                    await serve(config, stop=stop, started=started)

                uvloop.run(main())
    finally:
        stop_logging()
    return results


def counted(variant: str, reads: int, args: argparse.Namespace) -> list[int]:
    """The callgrind totals (``EVENTS``) of one broker serving ``reads`` reads."""
    size = args.ll * 1024
    argv = [sys.executable, __file__, "--one", variant, "--reads", str(reads)]
    argv += ["--frames", str(args.frames), "--payload", str(args.payload)]
    cmd = ["valgrind", "--tool=callgrind", "--cache-sim=yes", "--D1=32768,8,64", f"--LL={size},8,64"]
    with tempfile.TemporaryDirectory(prefix="hpfeeds-di-cg-") as tmp:
        out = Path(tmp, "callgrind.out")
        subprocess.run(
            [*cmd, f"--callgrind-out-file={out}", *argv],
            capture_output=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts in every run
        )
        summary = next(line for line in out.read_text().splitlines() if line.startswith("summary:"))
    return [int(n) for n in re.findall(r"\d+", summary)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reads", type=int, default=200, help="publisher reads a run (default: 200)")
    p.add_argument("--frames", type=int, default=500, help="PUBLISH frames a read (default: 500)")
    p.add_argument("--payload", type=int, default=100, help="payload bytes a frame (default: 100)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each variant (default: 5)")
    p.add_argument("--ll", type=int, default=512, help="last-level cache simulated, KiB (default: 512)")
    p.add_argument("--no-callgrind", action="store_true", help="timing only")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the run under callgrind
    args = p.parse_args()
    if args.one:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            run_broker([args.one], args.reads, args.frames, args.payload)
        return
    messages = args.reads * args.frames
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        results = run_broker(list(VARIANTS) * args.rounds, args.reads, args.frames, args.payload)
    print(f"CPU time a message ({args.rounds} rounds of {messages:,} messages, {args.payload}-byte payloads):")
    for variant in VARIANTS:
        ns = sorted(cpu / messages * 1e9 for v, cpu in results if v == variant)
        print(f"  {variant:8} {statistics.median(ns):6.0f} ns ({ns[0]:.0f} to {ns[-1]:.0f})")
    if not callgrind_available(args.no_callgrind):
        return
    per: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        base, more = counted(variant, args.reads, args), counted(variant, 2 * args.reads, args)
        per[variant] = {e: (b - a) / messages for e, a, b in zip(EVENTS, base, more, strict=True)}
    print(f"Per message under callgrind ({2 * args.reads} reads minus {args.reads}; last level {args.ll} KiB):")
    print("  " + " ".join(f"{label:>16}" for _, label in (("", "variant"), *SHOWN)))
    for variant in VARIANTS:
        print("  " + f"{variant:>16}" + "".join(f" {per[variant][e]:16,.2f}" for e, _ in SHOWN))


if __name__ == "__main__":
    main()
