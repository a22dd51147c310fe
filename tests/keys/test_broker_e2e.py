"""The whole story with a running broker: keys managed with the CLI take effect
for the next connection, and revocation reaches live sessions — for sqlite and
for PostgreSQL."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hpfeeds3.protocol import Decoder, Error, Info, Publish, encode_auth, encode_publish, sign
from tests.support.broker import RawClient, confirm_subscribed, running_broker
from tests.support.metrics import metric, scrape

from .conftest import Result

Keys = Callable[..., Result]

# Issue 4: revocation reaches live sessions within 5 s by default.
REVOCATION_BOUND_S = 5.0


def published(client: RawClient, seconds: float) -> list[Publish]:
    """Every PUBLISH delivered to ``client`` within ``seconds`` (ERRORs are skipped)."""
    got: list[Publish] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = client.next_frame(left)
        except TimeoutError:
            break
        if isinstance(frame, Publish):
            got.append(frame)
        else:
            assert isinstance(frame, Error), frame
    return got


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_cli_changes_reach_new_and_live_connections(
    keys: Keys, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    spec = f"sqlite:{tmp_path / 'sqlite.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_dsn")
    pub_secret = keys("add", "sensor", "--pub", "events", "--auth", spec).out.strip()
    sub_secret = keys("add", "collector", "--sub", "other", "--auth", spec).out.strip()
    assert pub_secret and sub_secret

    with running_broker(tmp_path, "--auth", spec) as broker:
        port = broker.port
        assert port is not None
        with RawClient(port) as pub:
            pub.auth("sensor", pub_secret)
            # not granted yet: the subscription is refused
            with RawClient(port) as sub:
                sub.auth("collector", sub_secret)
                sub.subscribe("events")
                assert "events" in sub.expect_error()

            # grant → the next connection may subscribe, and receives
            assert keys("grant", "collector", "--sub", "events", "--auth", spec).code == 0
            with RawClient(port) as sub:
                sub.auth("collector", sub_secret)
                sub.subscribe("events")
                sub.expect_silence(0.2)
                pub.publish("events", b"one")
                assert [m.payload for m in sub.messages(1)] == [b"one"]

                # revoke → the live subscription ends within the bound
                assert keys("revoke", "collector", "--sub", "events", "--auth", spec).code == 0
                broker.wait_log("unsubscribing", timeout=REVOCATION_BOUND_S)
                pub.publish("events", b"two")
                assert published(sub, 0.5) == []

            # remove → the live connection is closed and a new one refused
            assert keys("remove", "sensor", "--auth", spec).code == 0
            pub.expect_closed(timeout=REVOCATION_BOUND_S)
            with RawClient(port) as again:
                again.auth("sensor", pub_secret)
                assert "authfail" in again.expect_error()


def test_rows_without_a_secret_authenticate_nobody(tmp_path: Path) -> None:
    """NULL or empty secret: SHA1(nonce) does not log in; BLOB or numeric: a clean authfail, not a reset."""
    import hashlib
    import sqlite3

    from hpfeeds3.protocol import encode_auth

    db = tmp_path / "sqlite.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "create table authkeys (id integer primary key autoincrement, owner, ident, secret, pubchans, subchans)"
    )
    with conn:
        for ident, secret in (("null", None), ("empty", ""), ("blob", b"s3cret"), ("numeric", 12345)):
            conn.execute(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('o', ?, ?, '[\"c\"]', '[]')",
                (ident, secret),
            )
    conn.close()
    with running_broker(tmp_path, "--auth", f"sqlite:{db}") as broker:
        assert broker.port is not None
        for ident, guess in (("null", b""), ("empty", b""), ("blob", b"s3cret"), ("numeric", b"12345")):
            with RawClient(broker.port) as c:
                nonce = c.read_info().nonce
                c.send(encode_auth(ident.encode(), hashlib.sha1(nonce + guess).digest()))
                frames = c.expect_closed()
                assert frames and isinstance(frames[-1], Error), (ident, frames)
                assert frames[-1].message == f"authfail: Authentication failed for {ident}", ident
        # Log lines are written by a writer thread: wait for the last one, bounded.
        log = broker.wait_log("the key for 'numeric' is not valid")
    for ident in ("null", "empty", "blob", "numeric"):
        assert f"the key for {ident!r} is not valid" in log
    assert "Traceback" not in log


def test_chain_with_postgresql_down_serves_the_idents_sqlite_knows(keys: Keys, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = f"postgresql://hpfeeds:hunter2@127.0.0.1:{closed}/hpfeeds?password=hunter3"
    local = f"sqlite:{tmp_path / 'local.db'}"
    assert keys("add", "local-sensor", "--secret", "l", "--pub", "c", "--auth", local).code == 0
    with running_broker(tmp_path, "--auth", down, "--auth", local) as broker:
        assert broker.port is not None
        with RawClient(broker.port) as c:
            c.auth("local-sensor", "l")
            c.publish("c", b"served while the database is down")
            c.expect_silence(0.3)  # no ERROR: logged in, allowed
        with RawClient(broker.port) as c:
            c.auth("remote-sensor", "r")
            assert c.expect_error() == (
                "authfail: Authentication failed for remote-sensor: the key store is unavailable, try again later"
            )
        log = broker.wait_log("hpfeeds:***@")
    assert "hpfeeds:***@" in log and "hunter" not in log


@pytest.mark.parametrize("kind", ["sqlite", "json"])
def test_a_durable_key_is_served_like_any_other_and_turning_it_on_keeps_its_session(
    keys: Keys, tmp_path: Path, kind: str
) -> None:
    spec = f"sqlite:{tmp_path / 'sqlite.db'}" if kind == "sqlite" else str(tmp_path / "keys.json")
    pub_secret = keys("add", "sensor", "--pub", "events", "--auth", spec).out.strip()
    sub_secret = keys("add", "collector", "--sub", "events", "spare", "--durable", "--auth", spec).out.strip()
    with running_broker(tmp_path, "--auth", spec) as broker:
        port = broker.port
        assert port is not None
        with RawClient(port) as pub, RawClient(port) as sub:
            pub.auth("sensor", pub_secret)
            sub.auth("collector", sub_secret)
            sub.subscribe("events")
            sub.subscribe("spare")
            sub.expect_silence(0.2)
            pub.publish("events", b"one")
            assert [m.payload for m in sub.messages(1)] == [b"one"]
            # the flag changes (the broker rechecks the live session), then a channel is
            # revoked: once that is seen, the flag's change was applied too, and kept the session
            assert keys("update", "collector", "--no-durable", "--auth", spec).code == 0
            assert keys("revoke", "collector", "--sub", "spare", "--auth", spec).code == 0
            broker.wait_log("unsubscribing", timeout=REVOCATION_BOUND_S)
            pub.publish("events", b"two")
            assert [m.payload for m in sub.messages(1)] == [b"two"]


def test_guesses_whose_postgresql_lookup_ends_after_the_block_are_refused_unverified(
    keys: Keys, tmp_path: Path, postgres_dsn: str
) -> None:
    # With PostgreSQL every AUTH waits for its lookup, so a burst of wrong-secret
    # AUTHs is in flight at once: the ones whose lookup ends after the limiter
    # blocked the pair are refused without their guess being checked.
    guesses = 60  # under the per-address pre-auth bound (64)
    assert keys("add", "sensor", "--pub", "events", "--auth", postgres_dsn).code == 0
    with running_broker(tmp_path, "--auth", postgres_dsn, exporter=True) as broker:
        assert broker.port is not None
        socks = [socket.create_connection(("127.0.0.1", broker.port), timeout=5) for _ in range(guesses)]
        try:
            nonces = []
            for sock in socks:
                decoder = Decoder.for_client()
                frames: list[object] = []
                while not frames:
                    frames = list(decoder.feed(sock.recv(4096)))
                assert isinstance(frames[0], Info)
                nonces.append(frames[0].nonce)
            for sock, nonce in zip(socks, nonces, strict=True):
                sock.sendall(encode_auth(b"sensor", sign(nonce, b"a wrong secret")))
            for sock in socks:  # each is answered with an ERROR and closed
                while sock.recv(4096):
                    pass
        finally:
            for sock in socks:
                sock.close()
        samples = scrape(broker.exporter_port)
        verified = metric(samples, "hpfeeds_broker_auth_failures_total", reason="auth_failed")
        refused = metric(samples, "hpfeeds_broker_auth_failures_total", reason="rate_limited")
        assert verified <= 15 and verified + refused == guesses


def test_auth_publish_and_fin_sent_at_once_are_delivered_while_the_lookup_waits(
    keys: Keys, tmp_path: Path, postgres_dsn: str
) -> None:
    # A one-shot sensor (a script) sends AUTH, a PUBLISH and its FIN together; on
    # PostgreSQL its AUTH waits for the lookup when the FIN arrives: the PUBLISH is
    # still delivered, then the connection closes.
    pub_secret = keys("add", "sensor", "--pub", "events", "--auth", postgres_dsn).out.strip()
    sub_secret = keys("add", "collector", "--sub", "events", "--auth", postgres_dsn).out.strip()
    with running_broker(tmp_path, "--auth", postgres_dsn) as broker:
        assert broker.port is not None
        with RawClient(broker.port) as sub:
            sub.auth("collector", sub_secret)
            sub.subscribe("events")
            with RawClient(broker.port) as probe:
                confirm_subscribed(probe.auth("sensor", pub_secret), "events", sub)
            with RawClient(broker.port) as pub:
                info = pub.read_info()
                signed = encode_auth(b"sensor", sign(info.nonce, pub_secret.encode()))
                pub.send(signed + encode_publish(b"sensor", b"events", b"then-fin"))
                pub.sock.shutdown(socket.SHUT_WR)
                [msg] = sub.messages(1)
                assert msg.payload == b"then-fin"
                pub.expect_closed()
