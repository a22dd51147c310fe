"""What an open console costs the broker: pubsub throughput and handshake CPU, with and without it.

Not a test (CI asserts no speed): run it by hand on a quiet machine::

    python -m tests.console.cost [--rounds 3] [--duration 5] [--views page|all]

Each round starts a fresh broker without ``--admin`` and one with it (in
alternating order), and runs ``hpfeeds-bench pubsub-100 connect-50`` against
it; as in benchmarks/compare, the broker runs on core 0 and the load on core 1
(with two cores or more). With the console on, a poller reads views every 2 s: ``page`` (the
default) what an open page reads, the tab shown (Sensors, the first and the
heaviest); ``all`` more than any page, every view (sensors, connections,
channels, keys, events) each time. Prints the median of each figure and the
ratio on / off, and first the CPU the console's tracker adds to one
handshake (measured alone). The same in instructions, which a loaded machine
does not change: ``python -m tests.console.instructions`` (valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpfeeds3.broker.admin.tracker import Tracker
from hpfeeds3.broker.events import Authenticated, Closed, Connected
from hpfeeds3.broker.metrics import PublishStats
from hpfeeds3.broker.reasons import CloseReason
from hpfeeds3.broker.tuning import GC_THRESHOLDS
from tests.support.broker import BIN, BrokerProcess, free_port, wait_for_port
from tests.support.inprocess import idle_broker

from .conftest import Http, write_tokens

VIEWS = {
    "page": ("/api/v1/sensors",),
    "all": ("/api/v1/sensors", "/api/v1/connections", "/api/v1/channels", "/api/v1/keys", "/api/v1/events"),
}


def poll(base: str, token: str, views: tuple[str, ...], stop: threading.Event, count: list[int]) -> None:
    client = Http(base, token)
    while not stop.is_set():
        for view in views:
            assert client.get(view).status == 200
            count[0] += 1
        stop.wait(2.0)


def pin_process(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` (and those it starts later) on core ``cpu``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def pinning() -> bool:
    """As benchmarks/compare: the broker on core 0, the load on core 1, when there are two cores."""
    return len(os.sched_getaffinity(0)) >= 2


def workspace(workdir: Path) -> Path:
    """``workdir`` with the benchmark's keys (10,000, in users.json) and the console's tokens."""
    subprocess.run([str(BIN / "hpfeeds-bench"), "--write-json", "users.json"], cwd=workdir, check=True)
    admin, _ = write_tokens(workdir / "tokens.txt")
    (workdir / "admin-token").write_text(admin)
    return workdir


def broker_args(workdir: Path, port: int, admin_port: int | None) -> list[str]:
    """The broker's command line in ``workspace(workdir)``; with the console when ``admin_port``."""
    args = ["--bind", f"127.0.0.1:{port}", "--auth", str(workdir / "users.json")]
    if admin_port is not None:
        args += ["--admin", f"127.0.0.1:{admin_port}", "--admin-tokens", str(workdir / "tokens.txt")]
    return args


def run_once(workdir: Path, console: bool, duration: float, views: tuple[str, ...]) -> dict[str, dict]:
    port, admin_port = free_port(), free_port()
    broker = BrokerProcess(broker_args(workdir, port, admin_port if console else None), cwd=workdir, port=port)
    stop, polled = threading.Event(), [0]
    try:
        broker.wait_ready()
        pinned = pinning()
        if pinned:
            pin_process(broker.proc.pid, 0)
        poller = None
        if console:
            wait_for_port(admin_port, proc=broker.proc)
            token = (workdir / "admin-token").read_text()
            poller = threading.Thread(target=poll, args=(f"http://127.0.0.1:{admin_port}", token, views, stop, polled))
            poller.start()
        bench = [str(BIN / "hpfeeds-bench"), "--port", str(port), "--duration", str(duration), "--json-only"]
        out = subprocess.run(
            [*bench, "--broker-pid", str(broker.proc.pid), "pubsub-100", "connect-50"],
            check=True,
            capture_output=True,
            text=True,
            timeout=duration * 10 + 60,
            preexec_fn=(lambda: os.sched_setaffinity(0, {1})) if pinned else None,
        ).stdout
        stop.set()
        if poller is not None:
            poller.join(10)
            assert polled[0] > 0
        return {r["scenario"]: r for r in map(json.loads, out.splitlines()) if r.get("scenario")}
    finally:
        stop.set()
        broker.stop()


def tracker_cost_us(tracker_class: type[Tracker] = Tracker) -> float:
    """CPU the console's tracker adds to one handshake, in µs: its three events as
    connect-50 makes them (a primed tracker, one message published on one of 50
    channels) and the settle that counts them (at every poll; here every 1,000
    handshakes), less the same handshakes unobserved. The events are made afresh for
    each handshake and the cyclic GC runs at the broker's thresholds, as in the
    broker: what the tracker keeps of a connection is work for the GC, and is counted."""
    broker = idle_broker(asyncio.new_event_loop())
    tracker = tracker_class(broker)
    tracker._primed = True  # as after the first poll
    peer = "127.0.0.1:5555"
    channels = [b"slot-%d" % i for i in range(50)]

    def handshakes(observe: Callable[[Any], None]) -> None:
        for i in range(1000):
            stats = PublishStats()
            stats.count = 1
            observe(Connected(peer, i))
            observe(Authenticated(peer, i, "bench"))
            observe(Closed(peer, i, "bench", CloseReason.CLIENT_CLOSED, {channels[i % 50]: stats}))
        tracker.settle()

    def unobserved(event: Any) -> None:
        pass

    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        timed = {
            observe: min(timeit.repeat(functools.partial(handshakes, observe), "gc.enable()", number=20, repeat=7))
            / 20_000
            for observe in (unobserved, tracker.observe)
        }
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    return (timed[tracker.observe] - timed[unobserved]) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--views", choices=sorted(VIEWS), default="page", help="what the poller reads every 2 s")
    args = p.parse_args()
    print(f"console tracker: {tracker_cost_us():.2f} µs per handshake (connected + authenticated + closed, settled)")
    figures: dict[bool, dict[str, list[float]]] = {False: {}, True: {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workspace(Path(tmp))
        for round_ in range(args.rounds):
            # Alternate which goes first: the second run of a pair inherits the
            # first one's TIME_WAIT sockets and warmed caches.
            for console in (False, True) if round_ % 2 == 0 else (True, False):
                r = run_once(workdir, console, args.duration, VIEWS[args.views])
                f = figures[console]
                f.setdefault("pubsub-100 msg/s", []).append(r["pubsub-100"]["msgs_per_s"])
                f.setdefault("pubsub-100 broker CPU %", []).append(r["pubsub-100"]["broker_cpu_pct"])
                f.setdefault("connect-50 handshakes/s", []).append(r["connect-50"]["handshakes_per_s"])
                cpu_us = r["connect-50"]["broker_cpu_pct"] / 100 / r["connect-50"]["handshakes_per_s"] * 1e6
                f.setdefault("connect-50 broker CPU µs/handshake", []).append(cpu_us)
                time.sleep(1)
    heading = f"{'figure':40} {'without':>12} {'with console':>14} {'ratio':>7}"
    print(f"{heading}   (median of {args.rounds} rounds, views: {args.views})")
    for name in figures[False]:
        off, on = statistics.median(figures[False][name]), statistics.median(figures[True][name])
        print(f"{name:40} {off:12,.1f} {on:14,.1f} {on / off:7.3f}")
    print("all rounds:", json.dumps(figures))


if __name__ == "__main__":
    main()
