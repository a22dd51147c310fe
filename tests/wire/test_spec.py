"""The spec's scenarios, run as a user runs them: ``hpfeeds-broker`` in a temp
working directory, real sqlite, real environment, real TLS certificates."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import trustme

from hpfeeds3.broker.server import make_tls_context
from tests.support.broker import (
    BROKER_BIN,
    BrokerProcess,
    RawClient,
    confirm_subscribed,
    free_port,
    sqlite_add_key,
    until_logged,
)


def test_default_sqlite_insert_while_running_takes_effect_without_restart(tmp_path: Path, start_broker) -> None:
    b = start_broker(users=None)  # default auth: ./sqlite.db in the working directory
    db = tmp_path / "sqlite.db"
    assert db.exists()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600  # secrets in plaintext: owner only
    with RawClient(b.port) as c:
        c.auth("ident", "secret")
        c.expect_closed()
    sql = (
        "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) "
        "VALUES ('owner', 'ident', 'secret', '[\"chan1\"]', '[\"chan1\"]');"
    )
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(db), sql], check=True, timeout=10)
    else:
        conn = sqlite3.connect(db)
        conn.executescript(sql)
        conn.close()
    with RawClient(b.port) as c:
        c.auth("ident", "secret")
        c.subscribe("chan1")
        c.publish("chan1", b"no restart needed")
        assert c.messages(1)[0].payload == b"no restart needed"


def test_sqlite_path_spec(tmp_path: Path, start_broker) -> None:
    sqlite_add_key(tmp_path / "keys.db", "k", "s", ["c"], ["c"])
    b = start_broker("--auth", "sqlite:keys.db", users=None)
    with RawClient(b.port) as c:
        c.auth("k", "s")
        c.subscribe("c")
        c.publish("c", b"x")
        assert c.messages(1)[0].payload == b"x"


def test_env_auth_with_the_spec_variables(tmp_path: Path) -> None:
    port = free_port()
    env = {"HPFEEDS_TEST_SECRET": "test", "HPFEEDS_TEST_SUBCHANS": "spam", "HPFEEDS_TEST_PUBCHANS": "spam"}
    b = BrokerProcess([f"--bind=127.0.0.1:{port}", "--auth=env"], cwd=tmp_path, env=env, port=port)
    try:
        b.wait_ready()
        with RawClient(port) as c:
            c.auth("test", "test")
            c.subscribe("spam")
            c.publish("spam", b"eggs")
            assert c.messages(1)[0].payload == b"eggs"
    finally:
        assert b.stop() == 0


@pytest.fixture
def certs(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "broker.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "broker.crt"))
    return ca, tmp_path / "broker.crt", tmp_path / "broker.key"


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_tls_with_a_real_certificate(start_broker, certs) -> None:
    ca, crt, key = certs
    b = start_broker(f"--tlskey={key.name}", f"--tlscert={crt.name}")
    with RawClient(b.port, tls=client_ctx(ca)) as sub, RawClient(b.port, tls=client_ctx(ca)) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", sub)
        pub.publish("chan1", b"over tls")
        assert sub.messages(1)[0].payload == b"over tls"
        assert isinstance(sub.sock, ssl.SSLSocket) and sub.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_endpoint_beside_plain_bind(start_broker, certs) -> None:
    ca, crt, key = certs
    tls_port = free_port()
    b = start_broker("-e", f"tls:port={tls_port}:interface=127.0.0.1:cert={crt}:key={key}")
    from tests.support.broker import wait_for_port

    wait_for_port(tls_port)
    with RawClient(tls_port, tls=client_ctx(ca)) as sub, RawClient(b.port) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", sub)
        pub.publish("chan1", b"plain to tls")
        assert sub.messages(1)[0].payload == b"plain to tls"


def test_tls_below_1_2_is_refused(start_broker, certs) -> None:
    ca, crt, key = certs
    # The server's own floor (tests/reliability also sends raw TLS 1.0/1.1 ClientHellos to the port).
    assert make_tls_context(str(crt), str(key)).minimum_version == ssl.TLSVersion.TLSv1_2
    b = start_broker(f"--tlskey={key}", f"--tlscert={crt}")
    ctx = client_ctx(ca)
    # Security level 0: OpenSSL then really offers TLS 1.1 (else it refuses on the
    # client, before any ClientHello, with NO_CIPHERS_AVAILABLE).
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
        RawClient(b.port, tls=ctx).read_info()
    # The broker's answer to our ClientHello (an alert, or a close), not our own refusal to send one.
    assert getattr(refused.value, "reason", None) in (
        None,
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNEXPECTED_EOF_WHILE_READING",
    ), refused.value
    with RawClient(b.port, tls=client_ctx(ca)) as c:
        assert c.read_info().name == b"hpfeeds"


def test_tls_certificate_is_reloaded_without_dropping_live_connections(start_broker, certs, tmp_path) -> None:
    ca, crt, key = certs
    b = start_broker(f"--tlskey={key}", f"--tlscert={crt}")
    live = RawClient(b.port, tls=client_ctx(ca))
    live.auth("alice", "alice-secret")
    live.subscribe("chan1")
    ca2 = trustme.CA()
    cert2 = ca2.issue_cert("localhost", "127.0.0.1")

    def write_pair() -> None:
        cert2.private_key_pem.write_to_path(str(key))
        cert2.cert_chain_pems[0].write_to_path(str(crt))

    until_logged(b, "reloaded TLS certificate", write_pair)  # again until seen: the watcher starts after "serving"
    with RawClient(b.port, tls=client_ctx(ca2)) as fresh:
        fresh.auth("bob", "bob-secret")
    live.publish("chan1", b"still connected")
    assert live.messages(1)[0].payload == b"still connected"
    live.close()


def test_plaintext_to_the_tls_port_is_closed(start_broker, certs) -> None:
    ca, crt, key = certs
    b = start_broker(f"--tlskey={key}", f"--tlscert={crt}")
    got = b""
    with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x05\x02" * 10)
        s.settimeout(5)  # closed within 5 s, or recv raises TimeoutError
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(4096):
                got += data
    # No hpfeeds INFO in plaintext: nothing, or a TLS alert record (type 21).
    assert got[:1] in (b"", b"\x15"), got[:40]
    with RawClient(b.port, tls=client_ctx(ca)) as c:
        assert c.read_info().name == b"hpfeeds"


def run_broker_cli(tmp_path: Path, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BROKER_BIN, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_broker_cli(tmp_path, "--bind", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"hpfeeds-broker: error: cannot listen on tcp://127.0.0.1:{port}: address already in use"
    )


def test_tlscert_without_tlskey_is_refused(tmp_path: Path) -> None:
    r = run_broker_cli(tmp_path, "--tlscert", "x.crt")
    assert r.returncode == 2
    assert "--tlscert and --tlskey must be given together" in r.stderr


def test_unreadable_certificate_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "bad.crt").write_text("not a certificate")
    (tmp_path / "bad.key").write_text("not a key")
    r = run_broker_cli(tmp_path, "--bind", f"127.0.0.1:{free_port()}", "--tlscert", "bad.crt", "--tlskey", "bad.key")
    assert r.returncode == 1
    assert "cannot load TLS certificate 'bad.crt'" in r.stderr
    r = run_broker_cli(tmp_path, "--tlscert", "missing.crt", "--tlskey", "bad.key")
    assert r.returncode == 1  # a file that stops the start, as --help says; 2 is for malformed flags
    assert "cannot read TLS file 'missing.crt'" in r.stderr


def test_unopenable_database_is_one_clear_line(tmp_path: Path) -> None:
    r = run_broker_cli(tmp_path, "--bind", f"127.0.0.1:{free_port()}", "--auth", "sqlite:missing-dir/sqlite.db")
    assert r.returncode == 1
    assert "cannot open sqlite auth database 'missing-dir/sqlite.db'" in r.stderr


def test_bad_flag_exits_2(tmp_path: Path) -> None:
    r = run_broker_cli(tmp_path, "--no-such-flag")
    assert r.returncode == 2
    assert "unrecognized arguments" in r.stderr


def test_version(tmp_path: Path) -> None:
    r = run_broker_cli(tmp_path, "--version")
    assert r.returncode == 0 and r.stdout.startswith("hpfeeds-broker ")


def test_ipv6_bind(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = free_port()
    b = BrokerProcess(["--bind", f"[::1]:{port}", "--auth", "env"], cwd=tmp_path, port=port)
    try:
        deadline = time.monotonic() + 10
        while "serving" not in b.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("::1", port), timeout=5) as s:
            assert s.recv(100)[4] == 1  # INFO
    finally:
        b.stop()


def test_sigterm_exits_0_quickly(tmp_path: Path, start_broker) -> None:
    b = start_broker("--shutdown-drain", "2")
    c = RawClient(b.port)
    c.auth("alice", "alice-secret")
    c.subscribe("chan1")
    t0 = time.monotonic()
    assert b.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 3
    assert "broker stopped" in b.log()
    c.close()


def test_stalled_subscriber_does_not_stop_a_second_one(start_broker) -> None:
    b = start_broker("--send-stall-timeout", "1", "--send-buffer-hard", "4M")
    stalled_client = RawClient(b.port, rcvbuf=4096)
    stalled_client.auth("bob", "bob-secret")
    stalled_client.subscribe("chan1")
    with RawClient(b.port, timeout=20) as healthy, RawClient(b.port) as pub:
        healthy.auth("reader", "reader-secret")
        healthy.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", healthy, stalled_client)
        n = 3000
        payload = b"x" * 4000
        import threading

        got: list[int] = []

        # The second subscriber is read in a thread, message by message.
        def read_each() -> None:
            deadline = time.monotonic() + 30
            while len(got) < n and time.monotonic() < deadline:
                frame = healthy.next_frame(max(0.01, deadline - time.monotonic()))
                got.append(int(frame.payload[:8]))  # type: ignore[union-attr]

        t = threading.Thread(target=read_each, daemon=True)
        t.start()
        # A subscriber that keeps up: the publisher stays at most 200 messages
        # (800 KB) ahead of what it has read, well inside its 4 MB hard bound,
        # however slowly a loaded machine runs the reading thread.
        deadline = time.monotonic() + 30
        for i in range(n):
            while i - len(got) > 200 and t.is_alive() and time.monotonic() < deadline:
                time.sleep(0.001)
            pub.publish("chan1", b"%08d" % i + payload)
        t.join(40)
        assert got == list(range(n)), b.log()[-3000:]
        b.wait_log("slow_consumer", timeout=10)
    stalled_client.close()
