"""Durable keys end to end: real broker processes, real collector processes.

The collector (``collector.py``) stores each message before it consumes it
from its socket; it is killed with SIGKILL while a publisher sends numbered
messages, and what it stored over all its connections must hold every
number, each connection's numbers contiguous and in order, duplicates only
within the overlap.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess, RawClient, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO positions: Linux")

COLLECTOR = str(Path(__file__).with_name("collector.py"))
CHANNEL = "events"
PAYLOAD_BYTES = 100
# AUTH'd publisher "sensor" and durable collector "col" on CHANNEL: a PUBLISH frame's size.
FRAME_BYTES = 5 + 1 + len("sensor") + 1 + len(CHANNEL) + PAYLOAD_BYTES
OVERLAP = 6 * 1024 * 1024  # the default: at least a receive buffer Linux autotunes (tcp_rmem max)


def users(path: Path, *, durable: bool = True) -> Path:
    path.write_text(
        json.dumps(
            {
                "sensor": {"owner": "o", "secret": "s", "pubchans": [CHANNEL], "subchans": []},
                "col": {"owner": "o", "secret": "c", "pubchans": [], "subchans": [CHANNEL], "durable": durable},
                "live": {"owner": "o", "secret": "l", "pubchans": [], "subchans": [CHANNEL]},
            }
        )
    )
    return path


def payload(n: int) -> bytes:
    return f"{n:08d} ".encode().ljust(PAYLOAD_BYTES, b".")


def start_broker(tmp_path: Path, port: int, *extra: str) -> BrokerProcess:
    metrics = free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--auth", str(tmp_path / "users.json"), "--data-dir", str(tmp_path / "data")]
    args += ["--exporter", f"127.0.0.1:{metrics}", "--durable-overlap", str(OVERLAP)]
    b = BrokerProcess([*args, *extra], cwd=tmp_path, port=port).wait_ready()
    b.metrics_port = metrics  # type: ignore[attr-defined]
    return b


def metric(b: BrokerProcess, name: str, ident: str = "col") -> float | None:
    port = b.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{ident="{ident}"}} '):
            return float(line.split()[-1])
    return None


def wait_consuming(b: BrokerProcess, timeout: float = 10.0) -> None:
    """Until a connection of the durable key "col" consumes (it authenticated: the channel is kept)."""
    deadline = time.monotonic() + timeout
    while metric(b, "hpfeeds_durable_consuming") != 1:
        assert time.monotonic() < deadline, "the durable collector never authenticated"
        time.sleep(0.02)


@contextlib.contextmanager
def broker(tmp_path: Path, *extra: str, durable: bool = True) -> Iterator[BrokerProcess]:
    users(tmp_path / "users.json", durable=durable)
    b = start_broker(tmp_path, free_port(), *extra)
    try:
        yield b
    finally:
        b.stop()


def collector(b: BrokerProcess, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, COLLECTOR, str(b.port), "col", "c", CHANNEL, str(out), *extra])


def publisher(b: BrokerProcess) -> RawClient:
    p = RawClient(b.port)
    p.auth("sensor", "s")
    return p


def publish(p: RawClient, first: int, count: int) -> None:
    from hpfeeds3.protocol import encode_publish

    p.send(b"".join(encode_publish(b"sensor", CHANNEL.encode(), payload(n)) for n in range(first, first + count)))


def connections(out: Path) -> list[list[int]]:
    """What the collector stored: one list of numbers per connection."""
    conns: list[list[int]] = []
    for line in out.read_text().splitlines():
        if line == "C":
            conns.append([])
        elif line.startswith("E "):
            continue  # an ERROR (the broker closed it: a replaced or shut-down connection)
        elif line:
            conns[-1].append(int(line))
    return conns


def stored(out: Path) -> set[int]:
    return {n for conn in connections(out) for n in conn} if out.exists() else set()


def wait_stored(out: Path, total: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(stored(out)) < total:
        assert time.monotonic() < deadline, f"{total - len(stored(out))} of {total} missing after {timeout} s"
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(10)


def check(out: Path, total: int, *, duplicates_allowed: bool) -> int:
    """Every number stored; each connection contiguous and in order; returns the duplicates."""
    conns = connections(out)
    seen: set[int] = set()
    duplicates = 0
    highest = -1
    for conn in conns:
        if not conn:
            continue
        assert conn == list(range(conn[0], conn[0] + len(conn))), "a connection's messages are not contiguous"
        assert conn[0] <= highest + 1, f"gap: a connection starts at {conn[0]} after {highest}"
        # duplicates within the overlap: the overlap, one chunk of marks, the frames in flight
        again = highest + 1 - conn[0]
        assert again <= (OVERLAP + 64 * 1024) // FRAME_BYTES + 1, f"{again} messages sent again"
        duplicates += len(seen & set(conn))
        seen |= set(conn)
        highest = max(highest, conn[-1])
    assert seen == set(range(total)), f"missing: {sorted(set(range(total)) - seen)[:10]}"
    if not duplicates_allowed:
        assert duplicates == 0
    return duplicates


def test_backlog_then_live_and_a_clean_reconnect_repeats_nothing(tmp_path: Path) -> None:
    out = tmp_path / "stored.txt"
    with broker(tmp_path) as b, publisher(b) as p:
        c = collector(b, out)
        try:
            wait_consuming(b)  # from its first AUTH the channel is kept for it
            publish(p, 0, 500)
            wait_stored(out, 500)
            stop(c)  # SIGTERM: the collector's socket closes with FIN after what it stored
            publish(p, 500, 1500)  # while it is away
            c = collector(b, out)
            publish(p, 2000, 500)
            wait_stored(out, 2500)
        finally:
            stop(c)
    check(out, 2500, duplicates_allowed=False)
