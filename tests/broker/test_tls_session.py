"""``tls.TlsSession`` against a client ``ssl.SSLObject``, in memory: records cut
anywhere, a bounded amount handled per call, records without data bounded."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from hpfeeds3.broker.server import make_tls_context
from hpfeeds3.broker.tls import RecordsWithoutData, TlsSession
from hpfeeds3.broker.tuning import TLS_BYTES_PER_TURN, TLS_MIN_RECORD_PLAINTEXT

BOUND = 64  # --max-tls-records-without-data


@pytest.fixture(params=[ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def pair(request, tmp_path: Path) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, TlsSession]:
    """A client and the broker's session, handshake done; the client's (incoming, outgoing) BIOs."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    server = TlsSession(make_tls_context(str(tmp_path / "server.pem"), str(tmp_path / "server.pem")), BOUND)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.minimum_version = ctx.maximum_version = request.param
    into, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(into, out, server_hostname="localhost")
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            plain, reply = server.receive(out.read())
            assert plain == b""
            into.write(reply)
    else:
        pytest.fail("no handshake")
    server.receive(out.read())  # the client's Finished (TLS 1.3)
    assert server.established and not server.backlogged
    return client, into, out, server


def _drain(server: TlsSession, data: bytes) -> list[bytes]:
    """Plaintext of each call: the first with ``data``, then while backlogged."""
    got = [server.receive(data)[0]]
    while server.backlogged:
        got.append(server.receive(b"")[0])
    return got


def test_records_cut_at_every_byte_decrypt_in_order(pair) -> None:
    client, _, out, server = pair
    for i in range(20):
        client.write(b"frame %d " % i * 5)
    wire = out.read()
    plain = b"".join(server.receive(wire[i : i + 1])[0] for i in range(len(wire)))
    assert plain == b"".join(b"frame %d " % i * 5 for i in range(20))
    assert not server.backlogged


def test_one_call_handles_one_turn_and_the_rest_follows_in_order(pair) -> None:
    client, _, out, server = pair
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB
    client.write(data)
    wire = out.read()
    got = _drain(server, wire)
    assert b"".join(got) == data
    assert len(got) >= len(wire) // TLS_BYTES_PER_TURN
    assert max(len(g) for g in got) <= TLS_BYTES_PER_TURN


def test_records_without_data_past_the_bound_raise(pair) -> None:
    client, _, out, server = pair
    wire = b""
    for _ in range(2 * BOUND * TLS_MIN_RECORD_PLAINTEXT):  # one-byte records
        client.write(b"x")
        wire += out.read()
    with pytest.raises(RecordsWithoutData):
        _drain(server, wire)


def test_records_of_the_average_size_are_accepted(pair) -> None:
    client, _, out, server = pair
    record = b"r" * TLS_MIN_RECORD_PLAINTEXT
    wire = b""
    for _ in range(50 * BOUND):
        client.write(record)
        wire += out.read()
    assert b"".join(_drain(server, wire)) == record * 50 * BOUND
