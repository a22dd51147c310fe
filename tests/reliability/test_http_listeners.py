"""The broker's HTTP listeners (the console, ``--admin``, and ``--exporter``) run in
its process: whatever their ports receive must not take the descriptors its
sensors need.

Reproduced: with RLIMIT_NOFILE 600, 640 silent sockets on the console port (or
the exporter's) left the broker at 600/600 descriptors and 0/5 sensors served.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from hpfeeds3.broker.exporter import (
    CONSOLE_MAX_CONNECTIONS,
    EXPORTER_MAX_CONNECTIONS,
    HTTP_HEADER_TIMEOUT_S,
    HTTP_KEEPALIVE_S,
)
from hpfeeds3.protocol import Publish
from tests.console.conftest import write_tokens
from tests.support.broker import BrokerProcess, free_port, wait_for_port, write_users_json

from .support import RELIABILITY_USERS, Probe, raise_nofile, record
from .test_attacks import connect_from, round_trip

NOFILE = 600
SILENT = 640
SENSORS = 5


def settled_fds(probe: Probe, timeout: float = 5.0) -> int:
    """The broker's descriptor count once it stops changing for 0.3 s (or at the timeout)."""
    deadline = time.monotonic() + timeout
    last, since = probe.fds(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        n = probe.fds()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= 0.3:
            break
    return last


def http_answers(port: int, path: str, tls: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    """Whether ``GET path`` on ``port`` (over TLS with ``tls``) gets a status line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            s = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


@pytest.mark.parametrize("target", ["console", "console_tls", "exporter"])
def test_silent_sockets_on_an_http_port_leave_the_broker_its_descriptors(tmp_path: Path, target: str) -> None:
    """A TLS console counts a connection from accept too: silent sockets never
    finish a handshake, and must not take descriptors while they wait."""
    raise_nofile()
    write_users_json(tmp_path / "users.json", RELIABILITY_USERS)
    write_tokens(tmp_path / "tokens.txt")
    port, exporter, console = free_port(), free_port(), free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--auth", "users.json", "--exporter", f"127.0.0.1:{exporter}"]
    args += ["--admin", f"127.0.0.1:{console}", "--admin-tokens", "tokens.txt"]
    tls = None
    if target == "console_tls":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
        args += ["--admin-tlscert", "c.pem", "--admin-tlskey", "k.pem"]
        tls = ssl.create_default_context()
        ca.configure_trust(tls)
    b = BrokerProcess(args, cwd=tmp_path, port=port, nofile=(NOFILE, NOFILE))
    held: list[socket.socket] = []
    try:
        b.wait_ready()
        wait_for_port(console, proc=b.proc)
        probe = Probe(b.proc.pid)
        before = probe.fds()
        http_port, path = (exporter, "/healthz") if target == "exporter" else (console, "/")
        for _ in range(SILENT):  # each connected (the handshake done) before the next
            try:
                held.append(connect_from("127.0.0.1", http_port, timeout=2))
            except OSError:
                break
        during = settled_fds(probe)
        served = 0
        for i in range(SENSORS):
            try:
                with connect_from("127.0.0.1", port) as sock:
                    frame = round_trip(sock, "alice", "alice-secret", "chan1", f"sensor {i}".encode())
                served += isinstance(frame, Publish) and frame.payload == f"sensor {i}".encode()
            except OSError:
                pass
        # The silent ones are closed at the header deadline: the listener serves again.
        start = time.monotonic()
        while not http_answers(http_port, path, tls) and time.monotonic() - start < HTTP_HEADER_TIMEOUT_S + 10:
            time.sleep(0.2)
        recovered_s = time.monotonic() - start
        answers = http_answers(http_port, path, tls)
        cap = EXPORTER_MAX_CONNECTIONS if target == "exporter" else CONSOLE_MAX_CONNECTIONS
        record(
            "http_listener_descriptors",
            target=target,
            nofile=NOFILE,
            silent_sockets=SILENT,
            silent_connected=len(held),
            listener_cap=cap,
            broker_fds_before=before,
            broker_fds_during=during,
            sensors=SENSORS,
            sensors_served=served,
            http_serves_again_after_s=round(recovered_s, 1),
        )
        assert served == SENSORS
        assert during - before <= cap + 2
        assert answers
        assert b.proc.poll() is None
    finally:
        for s in held:
            s.close()
        b.stop()


def test_an_idle_keep_alive_connection_is_closed_soon(reliable_broker) -> None:
    """aiohttp keeps an idle keep-alive connection for an hour by default: each one a
    descriptor of the broker's. The exporter closes it after ``HTTP_KEEPALIVE_S``."""
    b = reliable_broker()
    with socket.create_connection(("127.0.0.1", b.exporter_port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = s.recv(65536)
        start = time.monotonic()
        s.settimeout(HTTP_KEEPALIVE_S + 10)
        try:
            while s.recv(65536):
                pass
            closed = True
        except TimeoutError:
            closed = False
        idle_s = time.monotonic() - start
    record("http_keep_alive", keepalive_s=HTTP_KEEPALIVE_S, closed_by_broker=closed, after_s=round(idle_s, 1))
    assert answer.startswith(b"HTTP/1.1 200")
    assert closed and idle_s < HTTP_KEEPALIVE_S + 5
