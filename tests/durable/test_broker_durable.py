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
import os
import random
import re
import resource
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from hpfeeds3.broker.config import BrokerConfig
from tests.support.broker import BROKER_BIN, BrokerProcess, RawClient, confirm_subscribed, free_port, wait_for_port

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


def payload(n: int, size: int = PAYLOAD_BYTES) -> bytes:
    return f"{n:08d} ".encode().ljust(size, b".")


def start_broker(tmp_path: Path, port: int, *extra: str) -> BrokerProcess:
    metrics = free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--auth", str(tmp_path / "users.json"), "--data-dir", str(tmp_path / "data")]
    args += ["--exporter", f"127.0.0.1:{metrics}", "--durable-overlap", str(OVERLAP)]
    b = BrokerProcess([*args, *extra], cwd=tmp_path, port=port).wait_ready()
    b.metrics_port = metrics  # type: ignore[attr-defined]
    return b


def metric(b: BrokerProcess, name: str, ident: str | None = "col") -> float | None:
    """A sample of the broker's /metrics (``ident=None``: one without labels)."""
    port = b.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{ident="{ident}"}} ' if ident is not None else f"{name} "):
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


def publisher(b: BrokerProcess, tls: ssl.SSLContext | None = None) -> RawClient:
    p = RawClient(b.port, tls=tls)
    p.auth("sensor", "s")
    return p


def publish(p: RawClient, first: int, count: int, size: int = PAYLOAD_BYTES) -> None:
    from hpfeeds3.protocol import encode_publish

    p.send(b"".join(encode_publish(b"sensor", CHANNEL.encode(), payload(n, size)) for n in range(first, first + count)))


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


def publish_paced(p: RawClient, total: int, per_batch: int, pause_s: float, until: Callable[[int], None]) -> None:
    """``total`` numbered messages in batches, ``until(sent)`` called between them (it may kill and restart)."""
    sent = 0
    while sent < total:
        n = min(per_batch, total - sent)
        publish(p, sent, n)
        sent += n
        until(sent)
        time.sleep(pause_s)  # a publisher's pace, not synchronisation


def run_killed_collector(
    b: BrokerProcess, out: Path, total: int, *extra: str, tls: ssl.SSLContext | None = None
) -> int:
    """Publish ``total`` messages while the collector is SIGKILLed every 1-2 s; returns the kills."""
    rng = random.Random(22)
    kills = 0
    c = collector(b, out, *extra)
    wait_consuming(b)
    next_kill = time.monotonic() + rng.uniform(1.0, 2.0)

    def maybe_kill(_sent: int) -> None:
        nonlocal c, next_kill, kills
        if time.monotonic() >= next_kill:
            stop(c, signal.SIGKILL)
            kills += 1
            c = collector(b, out, *extra)
            next_kill = time.monotonic() + rng.uniform(1.0, 2.0)

    try:
        with publisher(b, tls) as p:
            publish_paced(p, total, 100, 0.03, maybe_kill)
            wait_stored(out, total)
    finally:
        stop(c)
    return kills


def test_a_collector_killed_every_one_to_two_seconds_misses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "stored.txt"
    with broker(tmp_path) as b:
        kills = run_killed_collector(b, out, 20_000)
        duplicates = check(out, 20_000, duplicates_allowed=True)
        assert kills >= 2
        sent_again = metric(b, "hpfeeds_durable_overlap_duplicates_total")
        assert sent_again is not None and sent_again >= duplicates


def test_the_same_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "broker.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "broker.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    out = tmp_path / "stored.txt"
    tls = ("--tlscert", str(tmp_path / "broker.crt"), "--tlskey", str(tmp_path / "broker.key"))
    with broker(tmp_path, *tls) as b:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))  # the publisher speaks TLS too
        kills = run_killed_collector(b, out, 20_000, "--tls", str(tmp_path / "ca.pem"), tls=ctx)
    # A TLS collector reads records whole: what it read and had not stored when killed
    # is lost only if its socket had nothing unread left (docs/durable.md); this
    # collector stores each read at once, so none is missing here.
    check(out, 20_000, duplicates_allowed=True)
    assert kills >= 2


def test_the_pypi_client_as_the_collector_unchanged(tmp_path: Path) -> None:
    from tests.support.reference import ensure_reference_venv

    exe = ensure_reference_venv() / "bin" / "hpfeeds"
    out = tmp_path / "stored.txt"

    def reference_collector(b: BrokerProcess) -> subprocess.Popen[bytes]:
        args = ["subscribe", "--host", "127.0.0.1", "-p", str(b.port), "-i", "col", "-s", "c", "-c", CHANNEL]
        with open(out, "ab") as f:
            f.write(b"C\n")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            return subprocess.Popen([str(exe), *args], stdout=f, stderr=subprocess.DEVNULL, env=env)

    def numbers() -> list[list[int]]:
        conns: list[list[int]] = []
        for line in out.read_text().splitlines():
            if line == "C":
                conns.append([])
            else:
                conns[-1] += [int(m) for m in re.findall(r"(\d{8}) \.", line)]
        return conns

    def wait_numbers(total: int) -> None:
        deadline = time.monotonic() + 30
        while len({n for c in numbers() for n in c}) < total:
            assert time.monotonic() < deadline, f"{total - len({n for c in numbers() for n in c})} missing"
            time.sleep(0.05)

    with broker(tmp_path) as b, publisher(b) as p:
        c = reference_collector(b)
        try:
            wait_consuming(b)
            publish(p, 0, 500)
            wait_numbers(500)
            stop(c)  # printed everything it read: its socket ends with FIN
            publish(p, 500, 1500)
            c = reference_collector(b)
            publish(p, 2000, 500)
            wait_numbers(2500)
        finally:
            stop(c)
    conns = numbers()
    assert [n for conn in conns for n in conn] == list(range(2500)), "missing, repeated or out of order"


def test_broker_killed_and_restarted_during_replay_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "stored.txt"
    total = 20_000
    users(tmp_path / "users.json")
    port = free_port()
    b = start_broker(tmp_path, port)
    try:
        c = collector(b, out)
        wait_consuming(b)
        stop(c, signal.SIGKILL)  # away: what follows is its backlog
        with publisher(b) as p:
            publish(p, 0, total)
            deadline = time.monotonic() + 20
            while (metric(b, "hpfeeds_durable_disk_bytes", ident=None) or 0) < total * FRAME_BYTES:
                assert time.monotonic() < deadline, "the log never held every message"
                time.sleep(0.05)
        b.stop(signal.SIGKILL)  # everything that reached the log must survive
        b = start_broker(tmp_path, port)
        c = collector(b, out)
        deadline = time.monotonic() + 20
        while len(stored(out)) < 1000:
            assert time.monotonic() < deadline, "no replay after the restart"
            time.sleep(0.01)
        b.stop(signal.SIGKILL)  # during the replay
        stop(c)
        b = start_broker(tmp_path, port)
        c = collector(b, out)
        wait_stored(out, total)
        stop(c)
    finally:
        b.stop()
    check(out, total, duplicates_allowed=True)


def test_a_live_collector_fed_from_memory_never_got_what_a_broker_kill_left_unwritten(tmp_path: Path) -> None:
    """A collector that keeps up is handed the bytes the writer has just written (not read
    back from the file): everything it received is in the log after the broker is
    SIGKILLed in the middle of a publisher's stream, and the log holds no gap before."""
    from hpfeeds3.broker.durable import DurableConfig, SegmentLog
    from hpfeeds3.broker.durable.format import frame_ends

    out = tmp_path / "stored.txt"
    with broker(tmp_path) as b:
        c = collector(b, out)
        try:
            wait_consuming(b)
            with publisher(b) as p:
                sent = 0
                while len(stored(out)) < 20_000:
                    assert sent < 2_000_000, "the collector received nothing"
                    publish(p, sent, 500)
                    sent += 500
                with contextlib.suppress(OSError):
                    publish(p, sent, 5000)  # in flight when the broker dies
                b.kill()
        finally:
            stop(c)
    received = stored(out)
    log = SegmentLog.open(DurableConfig(data_dir=str(tmp_path / "data")))
    try:
        reader = log.open_reader(CHANNEL.encode(), 0)
        logged: list[int] = []
        while (chunk := reader.read(1 << 20)) is not None:
            data, start = bytes(chunk.data), 0
            for end in frame_ends(data):
                logged.append(int(data[start:end][-PAYLOAD_BYTES:][:8]))
                start = end
        reader.close()
    finally:
        log.close()
    assert logged == list(range(len(logged)))
    assert received and received <= set(logged), f"received, never written: {sorted(received - set(logged))[:10]}"


def test_max_bytes_drops_the_oldest_and_counts_them_exactly(tmp_path: Path) -> None:
    out = tmp_path / "stored.txt"
    total = 3000  # 357,000 bytes of frames, over a bound of 64 KiB
    with broker(tmp_path, "--durable-max-bytes", "64K") as b:
        c = collector(b, out)
        wait_consuming(b)
        stop(c, signal.SIGKILL)
        with publisher(b) as p:
            publish(p, 0, total)
            deadline = time.monotonic() + 20
            while (metric(b, "hpfeeds_durable_backlog_bytes") or 1e9) > 64 * 1024 + 8192:
                assert time.monotonic() < deadline, "the bound was never applied"
                time.sleep(0.05)
        dropped = int(metric(b, "hpfeeds_durable_dropped_total") or 0)
        assert 0 < dropped < total
        c = collector(b, out)
        try:
            deadline = time.monotonic() + 20
            while len(stored(out)) < total - dropped:
                assert time.monotonic() < deadline, f"{total - dropped - len(stored(out))} kept messages missing"
                time.sleep(0.05)
        finally:
            stop(c)
        assert stored(out) == set(range(dropped, total)), "the oldest are dropped, every other one kept"
        assert metric(b, "hpfeeds_durable_dropped_total") == dropped
        assert b.log().count("dropped") == 1, "drops are logged once a minute"


def test_a_key_that_is_not_durable_is_unchanged(tmp_path: Path) -> None:
    with broker(tmp_path) as b, publisher(b) as p:
        live = RawClient(b.port)
        live.auth("live", "l")
        live.subscribe(CHANNEL)
        confirm_subscribed(p, CHANNEL, live)
        live.close()
        publish(p, 0, 10)  # while it is away: gone for a live key
        live = RawClient(b.port)
        live.auth("live", "l")
        live.subscribe(CHANNEL)
        confirm_subscribed(p, CHANNEL, live)
        live.close()
    # no durable key follows it yet: the channel is not logged at all
    assert not (tmp_path / "data" / "durable" / "channels").exists() or not any(
        (tmp_path / "data" / "durable" / "channels").iterdir()
    )


def durable_subscriber(b: BrokerProcess) -> RawClient:
    """A raw connection of the durable key "col", subscribed to CHANNEL."""
    client = RawClient(b.port)
    client.auth("col", "c")
    client.subscribe(CHANNEL)
    return client


def test_a_second_connection_of_a_durable_key_replaces_the_first(tmp_path: Path) -> None:
    with broker(tmp_path) as b, publisher(b) as p:
        first = durable_subscriber(b)
        wait_consuming(b)
        publish(p, 0, 5)
        assert [m.payload[:8] for m in first.messages(5)] == [b"%08d" % n for n in range(5)]
        second = durable_subscriber(b)
        assert first.expect_error().startswith("replaced:")
        first.expect_closed()
        publish(p, 5, 5)
        got = [int(second.messages(1)[0].payload[:8])]
        while got[-1] != 9:
            got.append(int(second.messages(1)[0].payload[:8]))
        assert got == list(range(got[0], 10))  # from its position (less the overlap) on, in order
        b.wait_log("replaces")
        second.close()
        first.close()


def test_what_a_replaced_connection_left_unread_goes_to_the_newer_one(tmp_path: Path) -> None:
    # The broker closes the older connection: what its kernel acknowledged may sit
    # unread in its receive buffer, so its position goes back the overlap, as after
    # any close by the broker, and the newer connection is sent it.
    with broker(tmp_path) as b, publisher(b) as p:
        first = durable_subscriber(b)
        wait_consuming(b)
        publish(p, 0, 5)
        deadline = time.monotonic() + 10
        while metric(b, "hpfeeds_durable_replayed_total") != 5:  # sent to the first, which reads nothing
            assert time.monotonic() < deadline, "the first connection was never sent the messages"
            time.sleep(0.02)
        time.sleep(0.5)  # and its kernel acknowledged them (a delayed ACK waits at most 200 ms)
        second = durable_subscriber(b)
        publish(p, 5, 5)
        got = [int(m.payload[:8]) for m in second.messages(10)]
        assert got == list(range(10))
        b.wait_log("replaces")
        second.close()
        first.close()


def test_workers_serve_durable_keys_live_only() -> None:
    from hpfeeds3.broker.cli import build_parser, config_from_args

    def config(*argv: str) -> BrokerConfig:
        return config_from_args(build_parser().parse_args(list(argv)))

    assert config().durable
    assert not config("--workers", "2", "--cluster", "nats://127.0.0.1:4222").durable


def get_json(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # /healthz answers 503 with its body too
        return json.loads(e.read())


def test_the_console_api_and_healthz_carry_durable_state(tmp_path: Path) -> None:
    from hpfeeds3.broker.admin.tokens import generate_token, hash_token

    token = generate_token()
    (tmp_path / "tokens.txt").write_text(f"alice viewer sha256:{hash_token(token)}\n")
    admin = free_port()
    console = ("--admin", f"127.0.0.1:{admin}", "--admin-tokens", str(tmp_path / "tokens.txt"))
    with broker(tmp_path, *console) as b, publisher(b) as p:
        c = collector(b, tmp_path / "stored.txt")
        wait_consuming(b)
        stop(c, signal.SIGKILL)
        publish(p, 0, 50)
        deadline = time.monotonic() + 10
        while metric(b, "hpfeeds_durable_backlog_messages") != 50:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        keys = {k["ident"]: k for k in get_json(f"http://127.0.0.1:{admin}/api/v1/keys", token)["keys"]}
        state = keys["col"]["durable_state"]
        assert keys["col"]["durable"] is True and keys["live"]["durable_state"] is None
        assert state["backlog_messages"] == 50 and state["dropped"] == 0 and not state["consuming"]
        assert 0 <= state["oldest_unread_age_s"] < 60
        sensors = get_json(f"http://127.0.0.1:{admin}/api/v1/sensors?q=col", token)["sensors"]
        assert [s["durable"]["backlog_messages"] for s in sensors if s["ident"] == "col"] == [50]
        health = get_json(f"http://127.0.0.1:{b.metrics_port}/healthz")  # type: ignore[attr-defined]
        assert health["status"] == "serving" and health["durable"]["degraded"] is False


def test_a_full_disk_keeps_live_traffic_served_and_says_so(tmp_path: Path) -> None:
    """A file size limit (RLIMIT_FSIZE) stands in for a full disk: writes past it fail with EFBIG."""
    users(tmp_path / "users.json")
    port, metrics_port = free_port(), free_port()
    args = [BROKER_BIN, "--bind", f"127.0.0.1:{port}", "--auth", str(tmp_path / "users.json")]
    args += ["--data-dir", str(tmp_path / "data"), "--exporter", f"127.0.0.1:{metrics_port}"]
    limit = 256 * 1024
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        )
    try:
        wait_for_port(port, proc=proc)
        with RawClient(port) as live, RawClient(port) as p:
            p.auth("sensor", "s")
            live.auth("live", "l")
            live.subscribe(CHANNEL)
            col = RawClient(port)
            col.auth("col", "c")  # the channel is kept for it from now on
            col.close()
            confirm_subscribed(p, CHANNEL, live)
            # 60 KB messages: once the file is within one of its limit, every write fails
            deadline = time.monotonic() + 20
            first = 0
            while True:
                publish(p, first, 5, size=60_000)
                got = [int(m.payload[:8]) for m in live.messages(5)]
                assert got == list(range(first, first + 5)), "live traffic is served whatever the disk does"
                first += 5
                health = get_json(f"http://127.0.0.1:{metrics_port}/healthz")
                if health["status"] == "degraded" and first >= 20:
                    break
                assert time.monotonic() < deadline, health
        assert health["durable"]["degraded"] and health["durable"]["unstored"] > 0
        assert "File too large" in health["durable"]["last_error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert "messages are not being stored" in log_path.read_text()


def test_a_backlog_larger_than_the_send_buffer_bounds_is_replayed_without_a_cut(tmp_path: Path) -> None:
    """Replay is paced by the transport: 16 MB of backlog (more than the kernel's socket buffers
    hold) through a 512 KiB hard bound; while the collector does not read, the broker holds at
    most its high-water mark and one chunk for it."""
    from hpfeeds3.broker.durable.feed import CHUNK_BYTES
    from hpfeeds3.broker.tuning import BACKLOG_HIGH_BYTES

    total = 20_000
    bounds = ("--send-buffer-hard", "512K", "--send-buffer-soft", "384K")
    with broker(tmp_path, *bounds) as b:
        c = collector(b, tmp_path / "first.txt")
        wait_consuming(b)
        stop(c, signal.SIGKILL)
        with publisher(b) as p:
            for first in range(0, total, 1000):
                publish(p, first, 1000, size=800)
        with RawClient(b.port, rcvbuf=4096) as slow:
            slow.auth("col", "c")
            slow.subscribe(CHANNEL)
            deadline = time.monotonic() + 10
            held = 0.0
            while held < BACKLOG_HIGH_BYTES:  # the transport filled up to its mark: pacing holds it there
                assert time.monotonic() < deadline, f"the broker never queued up to its mark ({held})"
                held = metric(b, "hpfeeds_broker_connection_send_buffer_size") or 0.0
                time.sleep(0.05)
            for _ in range(10):
                held = metric(b, "hpfeeds_broker_connection_send_buffer_size") or 0.0
                assert held <= BACKLOG_HIGH_BYTES + CHUNK_BYTES, f"{held} bytes queued: replay is not paced"
                time.sleep(0.05)
            got = [int(m.payload[:8]) for m in slow.messages(total, timeout=60)]
        assert got == list(range(total))
        assert "slow_consumer" not in b.log()


def test_with_a_cluster_a_collector_back_on_its_broker_misses_what_another_broker_routed(tmp_path: Path) -> None:
    from tests.support.nats import NatsServer

    out = tmp_path / "stored.txt"
    nats = NatsServer(tmp_path).start()
    users(tmp_path / "users.json")
    a = b = None
    try:
        a = start_broker(tmp_path, free_port(), "--cluster", nats.url, "--data-dir", str(tmp_path / "a"))
        b = start_broker(tmp_path, free_port(), "--cluster", nats.url, "--data-dir", str(tmp_path / "b"))
        c = collector(b, out)  # the collector's broker is b; the sensor publishes to a
        wait_consuming(b)
        stop(c, signal.SIGKILL)
        with publisher(a) as p:
            deadline = time.monotonic() + 20
            n = 0
            while metric(b, "hpfeeds_durable_backlog_messages") in (None, 0.0):  # b gets the channel from a
                assert time.monotonic() < deadline, "the other broker never routed the channel here"
                publish(p, n, 1)
                n += 1
                time.sleep(0.05)
            publish(p, n, 1000 - n)
        c = collector(b, out)
        try:
            deadline = time.monotonic() + 20
            while not set(range(n, 1000)) <= stored(out):
                assert time.monotonic() < deadline, f"missing: {sorted(set(range(n, 1000)) - stored(out))[:5]}"
                time.sleep(0.05)
        finally:
            stop(c)
    finally:
        for broker_ in (a, b):
            if broker_ is not None:
                broker_.stop()
        nats.stop()
    conns = [conn for conn in connections(out) if conn]
    assert conns and conns[-1] == list(range(conns[-1][0], 1000)), "in order, no gap"
