"""Where the broker listens: an endpoint bound to a device (``-e ...:device=lo``,
SO_BINDTODEVICE; CI runs as root), and the IPv6 wildcard ``[::]``."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import USERS
from tests.support.broker import (
    BROKER_BIN,
    BrokerProcess,
    RawClient,
    free_port,
    free_ports,
    wait_for_port,
    write_users_json,
)


def listening(port: int) -> str:
    """``ss``'s line for the listener on ``port`` (it shows a bound device as ADDR%DEV:PORT)."""
    r = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True)
    return r.stdout


def test_endpoint_bound_to_a_device(start_broker) -> None:
    port = free_port()
    b = start_broker("-e", f"tcp:port={port}:interface=127.0.0.1:device=lo")
    wait_for_port(port, proc=b.proc)
    assert f"127.0.0.1%lo:{port} " in listening(port)
    assert f"127.0.0.1:{b.port} " in listening(b.port)  # --bind has no device
    with RawClient(port) as c:
        c.auth("alice", "alice-secret")
        c.subscribe("chan1")
        c.publish("chan1", b"over lo")
        assert c.messages(1)[0].payload == b"over lo"


def test_unknown_device_is_a_start_up_error(tmp_path: Path) -> None:
    port = free_port()
    endpoint = f"tcp:port={port}:interface=127.0.0.1"
    r = subprocess.run(
        [BROKER_BIN, "--bind", f"127.0.0.1:{free_port()}", "--auth", "env", "-e", f"{endpoint}:device=nosuchdev0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"hpfeeds-broker: error: cannot listen on tcp://127.0.0.1:{port}: No such device"
    )


def test_bind_to_the_ipv6_wildcard(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    # Below the ephemeral range: [::] also takes the port on every IPv4 and IPv6
    # address, so any outgoing connection on this machine that happens to use
    # it (another test's client, on any loopback address) would refuse the bind.
    port = free_ports(1)
    write_users_json(tmp_path / "users.json", USERS)
    b = BrokerProcess(["--bind", f"[::]:{port}", "--auth", "users.json"], cwd=tmp_path, port=port)
    try:
        wait_for_port(port, host="::1", proc=b.proc)
        assert f"listening on tcp://[::]:{port}" in b.wait_log("serving")
        with RawClient(port, host="::1") as c:
            c.auth("alice", "alice-secret")
            c.subscribe("chan1")
            c.publish("chan1", b"over IPv6")
            assert c.messages(1)[0].payload == b"over IPv6"
    finally:
        assert b.stop() == 0
