"""The broker's TLS handshake: ECDHE only, and a reconnecting sensor resumes its
session instead of paying for a full handshake (TLS 1.3 and 1.2)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from hpfeeds3.protocol import Decoder, Info
from tests.support.broker import BrokerProcess


@pytest.fixture(params=["ecdsa", "rsa"])
def tls_broker(request, start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> tuple[BrokerProcess, str]:
    key_type = trustme.KeyType.ECDSA if request.param == "ecdsa" else trustme.KeyType.RSA
    ca = trustme.CA(key_type=key_type)
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=key_type)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    broker = start_broker("--tlscert", "cert.pem", "--tlskey", "key.pem")
    return broker, str(tmp_path / "ca.pem")


def _client(ca: str, version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def _connect(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> tuple[bool, ssl.SSLSession]:
    """Handshake, read INFO (TLS 1.3 tickets arrive with it); (resumed?, session)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as sock:
        decoder = Decoder.for_client()
        frames: list = []
        while not frames:
            data = sock.recv(4096)
            assert data, "closed before INFO"
            frames = decoder.feed(data)
        assert isinstance(frames[0], Info)
        session_now = sock.session
        assert session_now is not None
        return bool(sock.session_reused), session_now


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_a_reconnecting_client_resumes_its_session(tls_broker, version: ssl.TLSVersion) -> None:
    broker, ca = tls_broker
    ctx = _client(ca, version)
    resumed, session = _connect(broker.port, ctx)
    assert not resumed
    for _ in range(3):  # a sensor reconnecting again and again
        resumed, session = _connect(broker.port, ctx, session)
        assert resumed


@pytest.mark.parametrize(
    "ciphers",
    [
        "AES256-GCM-SHA384:AES128-SHA",
        "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-SHA",
        "ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-ECDSA-AES256-SHA384",
    ],
    ids=["static-rsa", "dhe", "ecdhe-cbc"],
)
def test_tls12_without_ecdhe_and_aead_is_refused(tls_broker, ciphers: str) -> None:
    """Static RSA key exchange (no forward secrecy), finite-field DHE (slow) and
    CBC ciphers (MAC-then-encrypt, the padding-oracle family) are not offered."""
    broker, ca = tls_broker
    with pytest.raises(ssl.SSLError):
        _connect(broker.port, _client(ca, ssl.TLSVersion.TLSv1_2, ciphers))


def test_tls12_with_ecdhe_and_an_aead_cipher_is_served(tls_broker) -> None:
    broker, ca = tls_broker
    resumed, _ = _connect(broker.port, _client(ca, ssl.TLSVersion.TLSv1_2, "ECDHE+AESGCM"))
    assert not resumed
