"""A real third-party client against our broker: PyPI ``hpfeeds`` 3.1.0 (its
blocking client, its asyncio client and its ``hpfeeds`` command), installed in
its own virtual environment by ``tests.support.reference``; plain and TLS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trustme

from tests.reliability.support import wait_subscribed
from tests.support.broker import BrokerProcess, free_port
from tests.support.reference import popen_reference_cli, run_reference_cli, run_reference_python, stopping

BLOCKING_SUBSCRIBER = r"""
import sys, json, hpfeeds
host, port, ident, secret, chan, n, ca = sys.argv[1:]
hpc = hpfeeds.new(host, int(port), ident, secret, certfile=ca or None, reconnect=False)
hpc.subscribe([chan])
got = []
def on_message(ident, chan, payload):
    got.append([ident, chan, payload.hex()])
    if len(got) == int(n):
        hpc.stop()
def on_error(payload):
    print(json.dumps({"error": str(payload)}), flush=True)
    hpc.stop()
print("READY", flush=True)
hpc.run(on_message, on_error)
print(json.dumps({"got": got}), flush=True)
"""

BLOCKING_PUBLISHER = r"""
import sys, hpfeeds
host, port, ident, secret, chan, n, ca = sys.argv[1:]
hpc = hpfeeds.new(host, int(port), ident, secret, certfile=ca or None, reconnect=False)
for i in range(int(n)):
    hpc.publish([chan], b"msg-%d\x00\xff" % i)
err = hpc.wait(0.5)
print("ERROR" if err else "OK", err, flush=True)
hpc.close()
"""

ASYNCIO_ROUND_TRIP = r"""
import asyncio, json, ssl, sys
from hpfeeds.asyncio import ClientSession
host, port, ident, secret, chan, n, ca = sys.argv[1:]
async def main():
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    async with ClientSession(host, int(port), ident, secret, ssl=ctx) as client:
        client.subscribe(chan)  # handled before the publishes that follow it on this connection
        for i in range(int(n)):
            client.publish(chan, b"async-%d" % i)
        got = []
        for _ in range(int(n)):
            ident_, chan_, payload = await asyncio.wait_for(client.read(), 10)
            got.append([ident_, chan_, payload.decode()])
        print(json.dumps(got), flush=True)
asyncio.run(main())
"""


@pytest.fixture(params=["plain", "tls"])
def setup(request, start_broker, tmp_path: Path) -> tuple[BrokerProcess, str, int]:
    """(broker, CA file or "", the port of its /metrics)."""
    exporter = free_port()
    metrics = ("--exporter", f"127.0.0.1:{exporter}")
    if request.param == "plain":
        return start_broker(*metrics), "", exporter
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "broker.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "broker.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    broker = start_broker("--tlscert", "broker.crt", "--tlskey", "broker.key", *metrics)
    return broker, str(tmp_path / "ca.pem"), exporter


def args(broker: BrokerProcess, ident: str, secret: str, n: int, ca: str) -> list[str]:
    return ["127.0.0.1", str(broker.port), ident, secret, "chan1", str(n), ca]


def test_reference_blocking_client_publishes_and_subscribes(setup) -> None:
    broker, ca, exporter = setup
    exe_code = BLOCKING_SUBSCRIBER
    from tests.support.reference import ensure_reference_venv

    py = ensure_reference_venv() / "bin" / "python"
    import subprocess

    sub = subprocess.Popen(
        [str(py), "-c", exe_code, *args(broker, "bob", "bob-secret", 20, ca)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with stopping(sub):
        assert sub.stdout is not None
        assert sub.stdout.readline().strip() == b"READY"
        wait_subscribed(exporter, "bob", "chan1", 1)
        pub = run_reference_python(BLOCKING_PUBLISHER, args(broker, "alice", "alice-secret", 20, ca))
        assert pub.stdout.startswith(b"OK"), pub
        out, _err = sub.communicate(timeout=20)
    got = json.loads(out.decode().strip().splitlines()[-1])["got"]
    assert got == [["alice", "chan1", (b"msg-%d\x00\xff" % i).hex()] for i in range(20)]


def test_reference_asyncio_client_round_trip_with_self_delivery(setup) -> None:
    broker, ca, _ = setup
    r = run_reference_python(ASYNCIO_ROUND_TRIP, args(broker, "alice", "alice-secret", 50, ca))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    got = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert got == [["alice", "chan1", f"async-{i}"] for i in range(50)]


def test_reference_cli_publish_and_subscribe(setup) -> None:
    broker, ca, exporter = setup
    tls = ["--tls", "--tlscert", ca] if ca else []
    common = ["--host", "127.0.0.1", "-p", str(broker.port), *tls]
    sub = popen_reference_cli(["subscribe", *common, "-i", "bob", "-s", "bob-secret", "-c", "chan1"])
    with stopping(sub):
        deadline = time.monotonic() + 20
        assert sub.stdout is not None
        line = sub.stdout.readline()
        assert b"connected to hpfeeds" in line, line
        wait_subscribed(exporter, "bob", "chan1", 1)
        r = run_reference_cli(["publish", *common, "-i", "alice", "-s", "alice-secret", "-c", "chan1", "hello", "cli"])
        assert r.returncode == 0, r.stderr
        assert b"got error" not in r.stdout
        line = sub.stdout.readline()
        assert time.monotonic() < deadline
    assert b"publish to chan1 by alice" in line and b"hello cli" in line, line


def test_reference_cli_sees_auth_failure(setup) -> None:
    broker, ca, _ = setup
    tls = ["--tls", "--tlscert", ca] if ca else []
    r = run_reference_cli(
        ["subscribe", "--host", "127.0.0.1", "-p", str(broker.port), *tls, "-i", "alice", "-s", "wrong", "-c", "chan1"],
        timeout_s=20,
    )
    assert b"Authentication failed for alice" in r.stdout + r.stderr
