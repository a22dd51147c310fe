#!/usr/bin/env python3
"""What one plain connection costs the broker's own code, apart from the
kernel, the event loop and the load generator.

Storm sensors (connect, AUTH with a key of their own, SUBSCRIBE, PUBLISH, the
message delivered back, then closed by a reset, as ``hpfeeds-bench storm``
does) are driven straight through a running broker's ``Connection``
objects, in its own process, on transports that only keep what is written:
the real ``Broker``, ``Session``, key store (sqlite), admission, events, log
lines (written by the log thread to a file) and metrics, with no socket. The
same sensors are driven through ``benchmarks/ceiling.py``'s ``Forwarder``,
the least a Python process can do for them. Variants:

- ``ours``: the broker as it ships;
- ``ours, no events``: its event observers removed (no log lines, no
  console): what the events and their lines cost;
- ``ceiling``: the forwarder;
- ``driver``: this script's own share (the transports, the signed AUTH),
  subtracted from the others.

Figures: instructions a connection from ``valgrind --tool=callgrind``
(``--connections`` more sensors minus ``--connections``, so the start-up
cancels out: the count is the same on a busy machine), and the CPU time a
connection (every thread of the process; a round ends once its log lines
are written, so the log thread's share falls in its own round), median and
range over ``--rounds``, the variants interleaved (it moves with the machine).

    .venv/bin/python benchmarks/handshake_instructions.py [--connections 1000] [--rounds 5] [--no-callgrind]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpfeeds3.bench.credentials import storm_sensor, write_storm_sqlite
from hpfeeds3.bench.storm import sensor_address
from hpfeeds3.broker.logs import flush_logging
from hpfeeds3.protocol import OP_PUBLISH, encode_auth, encode_publish, encode_subscribe, sign

sys.path.insert(0, str(Path(__file__).resolve().parent))
from socketless import Transport, callgrind_available

VARIANTS = ("ours", "ours, no events", "ceiling", "driver")
MODES = {"ours": "ours", "ours, no events": "ours-quiet", "ceiling": "ceiling", "driver": "driver"}
HERE = Path(__file__).resolve().parent


def frames(i: int, nonce: bytes) -> bytes:
    """Sensor ``i``'s AUTH (signed for ``nonce``), SUBSCRIBE and PUBLISH, in one read."""
    ident, secret, channel = storm_sensor(i, False)
    ident_b, channel_b = ident.encode(), channel.encode()
    auth = encode_auth(ident_b, sign(nonce, secret.encode()))
    return auth + encode_subscribe(ident_b, channel_b) + encode_publish(ident_b, channel_b, b"x" * 32)


def drive(factory: Callable[[], Any] | None, first: int, n: int) -> tuple[float, float]:
    """Sensors ``first`` to ``first + n - 1`` through ``factory``'s protocols (None: the
    driver alone); returns the CPU seconds of the process to serve them and to close them."""
    protocols = []
    start = time.process_time()
    for i in range(first, first + n):
        transport = Transport(sensor_address(i), 40000 + i % 20000)
        if factory is None:
            frames(i, b"\x00\x01\x02\x03")
            continue
        protocol = factory()
        protocol.connection_made(transport)
        protocol.data_received(frames(i, transport.first[-4:]))  # the nonce ends INFO
        if transport.writes < 2 or transport.last[4] != OP_PUBLISH or transport.closing:
            raise SystemExit(f"sensor {i} was not served its message: {transport.last!r}")
        protocols.append(protocol)
    flush_logging()  # their log lines written: the log thread's share is counted here
    served = time.process_time()
    reset = ConnectionResetError()
    for protocol in protocols:
        protocol.connection_lost(reset)
    flush_logging()
    return served - start, time.process_time() - served


def run_ours(db: str, plan: list[tuple[str, int, int]], results: list[tuple[str, float, float]]) -> None:
    """A broker in this process, serving ``plan``'s (mode, first sensor, sensors) in turn."""
    import uvloop

    from hpfeeds3.broker.cli import build_parser, config_from_args, configure_logging
    from hpfeeds3.broker.connection import Connection
    from hpfeeds3.broker.logs import stop_logging
    from hpfeeds3.broker.server import serve

    ceiling = _ceiling()
    config = config_from_args(build_parser().parse_args(["--bind", "127.0.0.1:0", "--auth", f"sqlite:{db}"]))
    configure_logging(config.log_format, config.debug)

    async def main() -> None:
        stop = asyncio.Event()

        def started(broker: Any) -> None:
            async def go() -> None:
                try:
                    observers = list(broker._observers)
                    for mode, first, n in plan:
                        broker._observers[:] = [] if mode == "ours-quiet" else observers
                        factory = {"ceiling": ceiling.Forwarder, "driver": None}.get(mode, lambda: Connection(broker))
                        results.append((mode, *drive(factory, first, n)))
                        await asyncio.sleep(0.05)  # the broker's own tasks run between rounds
                finally:
                    stop.set()

            broker.spawn(go())

        await serve(config, stop=stop, started=started)

    try:
        uvloop.run(main())
    finally:
        stop_logging()


def _ceiling() -> Any:
    spec = importlib.util.spec_from_file_location("ceiling", HERE / "ceiling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_variant(args: argparse.Namespace) -> None:
    """Under callgrind: one variant, ``--connections`` sensors, nothing printed."""
    run_ours(args.db, [(args.one, 0, args.connections)], [])


def instructions(mode: str, db: str, n: int, extra: int, workdir: Path) -> float:
    """Instructions a connection: ``n + extra`` sensors minus ``n``, under callgrind."""
    counts = []
    for sensors in (n, n + extra):
        argv = [sys.executable, __file__, "--one", mode, "--db", db, "--connections", str(sensors)]
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
            capture_output=True,
            text=True,
            check=True,
            cwd=workdir,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts in every run
        ).stderr
        counts.append(int(next(line for line in out.splitlines() if "Collected" in line).split()[-1]))
    return (counts[1] - counts[0]) / extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=1000, help="sensors a round (default: 1000)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of every variant (default: 5)")
    p.add_argument("--no-callgrind", action="store_true", help="timing only")
    p.add_argument("--one", choices=sorted(set(MODES.values())), help=argparse.SUPPRESS)  # under callgrind
    p.add_argument("--db", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            one_variant(args)
        return
    with tempfile.TemporaryDirectory(prefix="hpfeeds-hs-") as tmp:
        work = Path(tmp)
        db = str(work / "keys.db")
        n = args.connections
        write_storm_sqlite(db, max(2 * n, n * args.rounds * len(VARIANTS)))
        # Interleaved: every variant in every round, each round's sensors new (a storm's
        # keys are each looked up once), the log lines to a file as a deployment's are.
        plan, first = [], 0
        for _ in range(args.rounds):
            for variant in VARIANTS:
                plan.append((MODES[variant], first, n))
                first += n
        results: list[tuple[str, float, float]] = []
        log_fd = os.open(work / "broker.log", os.O_WRONLY | os.O_CREAT)
        saved = os.dup(2)
        os.dup2(log_fd, 2)
        try:
            run_ours(db, plan, results)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(log_fd)
        served = {v: [s for m, s, _ in results if m == MODES[v]] for v in VARIANTS}
        closed = {v: [c for m, _, c in results if m == MODES[v]] for v in VARIANTS}
        driver = statistics.median(served["driver"])
        print(f"CPU time a connection ({args.rounds} rounds of {n} sensors; the driver's share subtracted):")
        for variant in VARIANTS[:-1]:
            us = sorted((s - driver) / n * 1e6 for s in served[variant])
            close_us = sorted(c / n * 1e6 for c in closed[variant])
            print(
                f"  {variant:16} served {statistics.median(us):6.1f} µs ({us[0]:.1f} to {us[-1]:.1f}),"
                f" closed {statistics.median(close_us):5.1f} µs ({close_us[0]:.1f} to {close_us[-1]:.1f})"
            )
        if not callgrind_available(args.no_callgrind):
            return
        counts = {v: instructions(MODES[v], db, n, n, work) for v in VARIANTS}
        what = f"callgrind, {2 * n} sensors minus {n}; the driver's share subtracted"
        print(f"Instructions a connection, served and closed ({what}):")
        for variant in VARIANTS[:-1]:
            print(f"  {variant:16} {counts[variant] - counts['driver']:10,.0f}")
        print(f"  {'driver':16} {counts['driver']:10,.0f}")


if __name__ == "__main__":
    main()
