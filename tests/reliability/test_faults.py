"""Faults (issue 7, item 6): kill -9 and restart, the key store locked and
removed, SIGTERM under load with a stalled subscriber, and the connection
limit reached by 1,000 connections.

Event-loop lag is measured from outside, with the canary's round trip
(publish -> the broker -> subscriber, both on loopback): a stalled loop shows
as canary latency.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

from hpfeeds3.client import BlockingClient
from hpfeeds3.protocol import Decoder, Error, encode_subscribe
from tests.support.broker import BrokerProcess, RawClient, confirm_subscribed, free_port, sqlite_add_key

from .support import (
    Canary,
    MiB,
    _authed_socket,
    metric,
    percentile,
    raise_nofile,
    record,
    scrape,
    speed_bound,
    wait_metric,
    wait_subscribed,
)
from .test_slow_consumers import publish

QUEUED = "hpfeeds_broker_connection_send_buffer_size"

KEYS = {
    "alice": ("alice-secret", ["chan1"], ["chan1"]),
    "bob": ("bob-secret", ["chan1"], ["chan1"]),
    "reader": ("reader-secret", [], ["chan1"]),
    "canary": ("canary-secret", ["canary"], ["canary"]),
}


def make_db(path: Path) -> Path:
    for ident, (secret, pub, sub) in KEYS.items():
        sqlite_add_key(path, ident, secret, pub, sub)
    return path


def start(tmp: Path, port: int, *args: str) -> BrokerProcess:
    exporter = free_port()
    b = BrokerProcess(["--bind", f"127.0.0.1:{port}", "--exporter", f"127.0.0.1:{exporter}", *args], cwd=tmp, port=port)
    b.exporter_port = exporter  # type: ignore[attr-defined]
    return b.wait_ready()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("pragma integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_kill_9_mid_stream_then_restart_keeps_sqlite_intact_and_clients_reconnect(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sqlite.db")
    port = free_port()
    b = start(tmp_path, port, "--auth", f"sqlite:{db}")
    got: list[bytes] = []
    stop = threading.Event()
    try:
        with BlockingClient("127.0.0.1", port, "bob", "bob-secret") as sub:
            sub.subscribe("chan1")

            def read() -> None:
                while not stop.is_set():
                    m = sub.get(timeout_s=0.2)
                    if m is not None:
                        got.append(m.payload)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            publisher = threading.Thread(target=publish, args=(port, 2000, 1.0), daemon=True)
            publisher.start()
            deadline = time.monotonic() + 10
            while not got:  # mid-stream: messages are flowing
                assert time.monotonic() < deadline, "no message reached the subscriber"
                time.sleep(0.02)
            b.proc.kill()  # SIGKILL mid-stream
            b.proc.wait(5)
            killed_with = b.proc.returncode
            b.stop()
            publisher.join(5)
            before_restart = len(got)
            ok = integrity(db)
            t0 = time.monotonic()
            b = start(tmp_path, port, "--auth", f"sqlite:{db}")
            with BlockingClient("127.0.0.1", port, "alice", "alice-secret") as pub:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and (not got or got[-1] != b"after restart"):
                    pub.publish("chan1", b"after restart")
                    time.sleep(0.2)
            reconnected_s = time.monotonic() - t0
            stop.set()
            reader.join(2)
    finally:
        stop.set()
        b.stop()
    record(
        "kill_9",
        killed_returncode=killed_with,
        delivered_before_kill=before_restart,
        sqlite_integrity=ok,
        subscriber_got_message_after_restart=bool(got) and got[-1] == b"after restart",
        restart_to_delivery_s=round(reconnected_s, 2),
    )
    assert killed_with == -signal.SIGKILL
    assert ok == "ok"
    assert got and got[-1] == b"after restart"


def test_auth_store_locked_then_removed_gives_clear_errors_and_sessions_keep_flowing(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sqlite.db")
    b = start(tmp_path, free_port(), "--auth", f"sqlite:{db}")
    try:
        canary = Canary(b.port).start()
        with RawClient(b.port) as sub, RawClient(b.port) as pub:
            sub.auth("bob", "bob-secret")
            sub.subscribe("chan1")
            pub.auth("alice", "alice-secret")
            confirm_subscribed(pub, "chan1", sub)
            canary.window()
            # A change (so the broker must read the file: its in-memory snapshot is older),
            # then an exclusive lock for 10 s: readers are refused.
            locker = sqlite3.connect(db, timeout=1, isolation_level=None)
            locker.execute("insert into authkeys (owner, ident, secret) values ('o', 'other', 's')")
            locker.execute("begin exclusive")
            locked_at = time.monotonic()
            attempts: list[tuple[str, float]] = []
            while time.monotonic() - locked_at < 9:
                with RawClient(b.port) as c:
                    t0 = time.monotonic()
                    c.auth("alice", "alice-secret")
                    frames = c.expect_closed(timeout=5)
                    attempts.append((frames[0].message if frames else "<closed>", time.monotonic() - t0))
                pub.publish("chan1", b"during the lock")
                assert sub.messages(1)[0].payload == b"during the lock"
            locked = canary.window()
            locker.execute("rollback")
            locker.close()
            with RawClient(b.port) as c:
                c.auth("alice", "alice-secret")
                c.subscribe("chan1")
                c.publish("chan1", b"store back")
                assert c.messages(1)[0].payload == b"store back"
            # Removed while running: the broker keeps serving (it holds the open file) and stays up.
            os.remove(db)
            with RawClient(b.port) as c:
                c.auth("alice", "alice-secret")
                c.subscribe("chan1")
                c.publish("chan1", b"file removed")
                after_remove = c.next_frame(3)
            removed = canary.window()
            pub.publish("chan1", b"session unaffected")
            seen = [sub.messages(1)[0].payload for _ in range(3)]
            assert b"session unaffected" in seen, seen
        total = canary.stop()
        samples = scrape(b.exporter_port)  # type: ignore[attr-defined]
    finally:
        b.stop()
    texts = {t for t, _ in attempts}
    record(
        "auth_store_unavailable",
        locked_s=9,
        auth_attempts_during_lock=len(attempts),
        auth_error_texts=sorted(texts),
        auth_error_after_s_max=round(max(t for _, t in attempts), 2),
        store_unavailable_metric=metric(samples, "hpfeeds_broker_auth_failures_total", reason="store_unavailable"),
        after_file_removed=repr(after_remove)[:80],
        lag_p50_ms_locked=round(locked.p50_ms, 3),
        lag_p99_ms_locked=round(locked.p99_ms, 3),
        lag_max_ms_locked=round(locked.max_ms, 3),
        lag_p99_ms_removed=round(removed.p99_ms, 3),
        **total.summary(),
    )
    assert texts == {"authfail: Authentication failed for alice: the key store is unavailable, try again later"}
    assert max(t for _, t in attempts) < 3.0  # the 2 s lookup bound, not a hang
    assert total.lost == 0 and total.received == total.sent
    speed_bound("auth_store_unavailable", "lag_p99_ms_locked", locked.p99_ms, below=10.0)


def test_sigterm_under_load_with_a_stalled_subscriber_exits_0_within_the_drain(tmp_path: Path) -> None:
    db = make_db(tmp_path / "sqlite.db")
    drain_s = 2.0
    b = start(tmp_path, free_port(), "--auth", f"sqlite:{db}", "--shutdown-drain", str(drain_s))
    stalled = _authed_socket(b.port, "reader", "reader-secret", rcvbuf=4096)
    stalled.sendall(encode_subscribe(b"reader", b"chan1"))
    healthy = RawClient(b.port)
    healthy.auth("bob", "bob-secret")
    healthy.subscribe("chan1")
    publisher = threading.Thread(target=publish, args=(b.port, 5000, 5.0), daemon=True)
    try:
        wait_subscribed(b.exporter_port, "reader", "chan1", 1)  # type: ignore[attr-defined]
        wait_subscribed(b.exporter_port, "bob", "chan1", 1)  # type: ignore[attr-defined]
        publisher.start()
        # Several MiB queued for the stalled one (below the 32 MiB bound).
        samples = wait_metric(b.exporter_port, lambda m: metric(m, QUEUED, ident="reader") >= 2 * MiB, timeout=15)  # type: ignore[attr-defined]
        queued = metric(samples, QUEUED, ident="reader")
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        rc = b.proc.wait(drain_s + 5)
        took = time.monotonic() - t0
    finally:
        b.stop()
        stalled.close()
        healthy.close()
        publisher.join(10)
    record(
        "sigterm_under_load", drain_s=drain_s, stalled_queued_bytes=queued, exit_code=rc, exit_after_s=round(took, 2)
    )
    assert queued > 0
    assert rc == 0
    assert took <= drain_s + 1.0


def test_the_connection_after_the_limit_gets_error_and_close(tmp_path: Path) -> None:
    raise_nofile()
    db = make_db(tmp_path / "sqlite.db")
    limit = 1000
    b = start(tmp_path, free_port(), "--auth", f"sqlite:{db}", "--max-connections", str(limit))
    conns: list[socket.socket] = []
    try:
        sub = RawClient(b.port)
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        pub = RawClient(b.port)
        pub.auth("alice", "alice-secret")
        for _ in range(limit - 2):
            conns.append(_authed_socket(b.port, "reader", "reader-secret"))
        deadline = time.monotonic() + 10  # until every AUTH is through
        while True:
            connected = metric(scrape(b.exporter_port), "hpfeeds_broker_client_connections")  # type: ignore[attr-defined]
            if connected >= limit or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        times = []
        texts = set()
        for _ in range(20):
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            times.append((time.perf_counter() - t0) * 1000)
            frames = Decoder.for_client().feed(data)
            texts.add(frames[0].message if frames and isinstance(frames[0], Error) else repr(frames))
        pub.publish("chan1", b"existing sessions unaffected")
        assert sub.messages(1)[0].payload == b"existing sessions unaffected"
        sub.close()
        pub.close()
    finally:
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()
        b.stop()
    record(
        "connection_limit",
        limit=limit,
        connected=connected,
        refused_p50_ms=round(percentile(times, 50), 2),
        refused_max_ms=round(max(times), 2),
        texts=sorted(texts),
    )
    assert connected == limit
    assert texts == {f"limit: too many connections (limit {limit})"}
    speed_bound("connection_limit", "refused_max_ms", max(times), below=100)
