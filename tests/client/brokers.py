"""Brokers for the client and CLI tests: the reference (PyPI hpfeeds 3.1.0) and
ours, plain and TLS, shared by every test of the session.

Each test takes its own channel from ``channel`` (a pool of names every key
may use), so tests sharing a broker never see each other's messages.
Authentication failures are few per broker: ours rate-limits them per address.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import pytest
import trustme

from hpfeeds3.client import Client
from tests.support.reference import Broker, our_broker, reference_broker, reference_tls_works

KINDS = ("reference", "hpfeeds3")

#: Channels every test key may use (handed out one per test by ``channel``).
CHANNELS = [f"chan{i}" for i in range(400)]
TESTER = ("tester", "tester-secret")
LIMITED = ("limited", "limited-secret")  # may use "allowed" only
USERS: dict[str, dict[str, Any]] = {
    TESTER[0]: {"secret": TESTER[1], "pubchans": CHANNELS, "subchans": CHANNELS},
    LIMITED[0]: {"secret": LIMITED[1], "pubchans": ["allowed"], "subchans": ["allowed"]},
}


class BrokerPool:
    """Starts each (kind, tls) broker on first use; ``close`` stops them all."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self._brokers: dict[tuple[str, bool], Broker] = {}
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_pem = workdir / "ca.pem"
        chain = workdir / "server-chain.pem"
        key = workdir / "server-key.pem"
        ca.cert_pem.write_to_path(self.ca_pem)
        cert.private_key_pem.write_to_path(key)
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        self.tls_files = (chain, key, self.ca_pem)
        self._next_channel = 0

    def get(self, kind: str, tls: bool) -> Broker:
        if kind == "reference" and tls and not reference_tls_works():
            pytest.skip("the reference broker's TLS needs Python <= 3.10 for its venv (see reference_python)")
        broker = self._brokers.get((kind, tls))
        if broker is None or broker.proc is None or broker.proc.poll() is not None:
            broker = self.new(kind, tls, f"{kind}-{'tls' if tls else 'plain'}").start()
            self._brokers[(kind, tls)] = broker
        return broker

    def new(self, kind: str, tls: bool, name: str) -> Broker:
        """A broker of its own (not started), e.g. for a test that kills it."""
        workdir = self.workdir / name
        files = self.tls_files if tls else None
        if kind == "reference":
            return reference_broker(workdir, USERS, files)
        return our_broker(workdir, USERS, files)

    def channel(self) -> str:
        self._next_channel += 1
        if self._next_channel >= len(CHANNELS):
            raise RuntimeError("add channels to CHANNELS: every test takes one")
        return CHANNELS[self._next_channel]

    def close(self) -> None:
        for broker in self._brokers.values():
            broker.stop()
        self._brokers.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def client_for(broker: Broker, key: tuple[str, str] = TESTER, **options: Any) -> Client:
    """An asyncio ``Client`` for ``broker`` (trusting the test CA when it is TLS)."""
    if broker.tls:
        options.setdefault("cafile", str(broker.tls_ca))
    return Client(broker.host, broker.port, key[0], key[1], **options)


def cli_args(broker: Broker, key: tuple[str, str] = TESTER) -> list[str]:
    """``--host/-p/-i/-s`` (and ``--tlscert``) for the ``hpfeeds`` command."""
    args = ["--host", broker.host, "-p", str(broker.port), "-i", key[0], "-s", key[1]]
    if broker.tls:
        args += ["--tlscert", str(broker.tls_ca)]
    return args
