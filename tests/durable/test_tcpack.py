"""Positions from TCP acknowledgements, against real sockets on 127.0.0.1.

A receiver reads N bytes and stops: its kernel acknowledges at least what it
read (and what sits in its receive buffer), and the tracker maps the
acknowledged bytes back to message positions exactly (plaintext). A receiver
that closes with unread data resets the connection: the abortive position,
an overlap back, is never past what the receiver read. Under TLS the mapping
is conservative: never past what was acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest
import trustme

from hpfeeds3.broker.durable.tcpack import (
    AckTracker,
    CloseKind,
    acked_wire_bytes,
    close_kind,
    tcp_bytes_acked,
    unacked_in_kernel,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO and SIOCOUTQ are Linux's")

MESSAGE = 1000  # bytes per message in these tests
RECEIVE_BUFFER = 64 * 1024
SEND_BUFFER = 1024 * 1024
WAIT_S = 10.0


@contextlib.contextmanager
def connected_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver) over 127.0.0.1; the receiver's buffer small, the sender's large, both fixed."""
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = socket.socket()
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    try:
        receiver.connect(listener.getsockname())
        sender, _ = listener.accept()
        # a fixed, large send buffer: after the receiver reads a little, more is still in flight
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            yield sender, receiver
        finally:
            sender.close()
    finally:
        receiver.close()
        listener.close()


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.005)


def send_messages(sender: socket.socket, tracker: AckTracker, count: int, channel: bytes = b"c") -> int:
    """Write messages ``1..count`` (position after message i is i) until the socket would block."""
    sender.setblocking(False)
    sent = 0
    for i in range(1, count + 1):
        try:
            n = sender.send(b"m" * MESSAGE)
        except BlockingIOError:
            break
        if n < MESSAGE:  # a partial write: the rest belongs to no mark yet
            tracker.wrote(n)
            break
        tracker.wrote(n, channel=channel, position=i)
        sent = i
    sender.setblocking(True)
    return sent


def read_exactly(receiver: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = receiver.recv(min(65536, n - got))
        assert chunk
        got += len(chunk)


def test_the_kernel_reports_acknowledged_bytes_both_ways() -> None:
    with connected_pair() as (sender, receiver):
        sender.sendall(b"x" * 5000)
        read_exactly(receiver, 5000)
        wait_until(lambda: tcp_bytes_acked(sender) == 5000, "all 5000 bytes acknowledged")
        assert unacked_in_kernel(sender) == 0
        assert acked_wire_bytes(sender, 5000, 0) == (5000, True)


def test_a_reader_that_stops_after_n_bytes_maps_to_exact_positions() -> None:
    tracker = AckTracker(overlap_bytes=4 * RECEIVE_BUFFER)
    with connected_pair() as (sender, receiver):
        sender.sendall(b"i" * 37)  # bytes before the messages (an INFO frame)
        tracker.wrote(37)
        tracker.start(b"c", 0)
        sent = send_messages(sender, tracker, 20_000)
        assert sent * MESSAGE > 2 * RECEIVE_BUFFER  # the receiver cannot hold it all
        read = 37 + 50 * MESSAGE + 123  # 50 whole messages and part of the next
        read_exactly(receiver, read)

        def settled() -> bool:
            before = tracker.acked_plain
            tracker.sample(sender)
            return tracker.acked_plain >= read and tracker.acked_plain == before

        wait_until(settled, "the receiver's kernel acknowledged what it read, and no more arrives")
        acked = tracker.acked_plain
        assert read <= acked < tracker.plain_written
        # plaintext: the acknowledged offset maps to whole messages exactly
        assert tracker.positions(CloseKind.CLEAN) == {b"c": (acked - 37) // MESSAGE}
        back = max(0, (acked - tracker.overlap_bytes - 37) // MESSAGE)
        assert tracker.positions(CloseKind.ABORTIVE) == {b"c": back}


def test_marks_map_back_per_channel_with_other_bytes_between() -> None:
    tracker = AckTracker(overlap_bytes=0)
    tracker.start(b"a", 10)
    tracker.start(b"b", 500)
    with connected_pair() as (sender, receiver):
        writes = [(b"a", 11), (None, None), (b"b", 501), (b"a", 12), (b"b", 502)]
        for channel, position in writes:
            sender.sendall(b"z" * 100)
            tracker.wrote(100, channel=channel, position=position)
        # the receiver reads 250 bytes: a's 11 and the unmarked write are whole, b's 501 half
        read_exactly(receiver, 250)
        wait_until(lambda: tracker.sample(sender) and tracker.acked_plain == 500, "everything acknowledged")
        assert tracker.positions() == {b"a": 12, b"b": 502}
        tracker2 = AckTracker(overlap_bytes=0)
        tracker2.start(b"a", 10)
        tracker2.start(b"b", 500)
        for channel, position in writes:
            tracker2.wrote(100, channel=channel, position=position)
        tracker2.acknowledged(250)
        assert tracker2.positions() == {b"a": 11, b"b": 500}


def test_a_reset_after_unread_data_and_the_overlap_never_skip_what_was_not_read() -> None:
    tracker = AckTracker(overlap_bytes=4 * RECEIVE_BUFFER)
    tracker.start(b"c", 0)
    with connected_pair() as (sender, receiver):
        sent = send_messages(sender, tracker, 20_000)
        read = 30 * MESSAGE + 500
        read_exactly(receiver, read)
        wait_until(lambda: tracker.sample(sender) and tracker.acked_plain > read, "unread bytes acknowledged")
        receiver.close()  # unread data in its buffer: Linux sends RST, not FIN
        sender.settimeout(WAIT_S)
        with pytest.raises(ConnectionResetError):
            sender.recv(1)
        # still readable after the reset, before the close
        tracker.sample(sender)
        acked = tracker.acked_plain
        assert read < acked <= sent * MESSAGE
        kind = close_kind(peer_fin=False, reset=True, closed_by_broker=False)
        assert kind is CloseKind.ABORTIVE
        assert tracker.positions(kind)[b"c"] <= read // MESSAGE  # nothing unread is skipped
        assert tracker.positions(CloseKind.CLEAN)[b"c"] > read // MESSAGE  # which the clean rule would have


def test_a_reader_that_read_everything_closes_with_fin_and_the_position_is_exact() -> None:
    tracker = AckTracker(overlap_bytes=4 * RECEIVE_BUFFER)
    tracker.start(b"c", 0)
    with connected_pair() as (sender, receiver):
        sender.sendall(b"m" * (MESSAGE * 40))
        for i in range(1, 41):
            tracker.wrote(MESSAGE, channel=b"c", position=i)
        read_exactly(receiver, MESSAGE * 40)
        receiver.shutdown(socket.SHUT_RDWR)
        assert sender.recv(1) == b""  # FIN
        tracker.sample(sender)
        kind = close_kind(peer_fin=True, reset=False, closed_by_broker=False)
        assert kind is CloseKind.CLEAN
        assert tracker.positions(kind) == {b"c": 40}  # no duplicate
        assert tracker.positions(CloseKind.ABORTIVE) == {b"c": 0}  # never before where it started
    assert close_kind(peer_fin=True, reset=False, closed_by_broker=True) is CloseKind.ABORTIVE


def test_the_ring_of_marks_is_bounded_and_forgetting_only_adds_duplicates() -> None:
    tracker = AckTracker(overlap_bytes=0, max_marks=8)
    tracker.start(b"c", 0)
    for i in range(1, 101):
        tracker.wrote(10, channel=b"c", position=i)
    assert len(tracker._marks) == 8
    tracker.acknowledged(500)  # mark 50 was forgotten: the position stays at the start
    assert tracker.positions() == {b"c": 0}
    tracker.acknowledged(1000)
    assert tracker.positions() == {b"c": 100}


def test_without_tcp_info_or_siocoutq_the_send_buffer_counts_as_unacknowledged() -> None:
    with connected_pair() as (sender, _receiver):
        send_buffer = sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        # what the fallback computes, from the numbers it reads
        tracker = AckTracker(overlap_bytes=0)
        tracker.wrote(send_buffer + 1000)
        tracker.acknowledged(max(0, tracker.wire_written - send_buffer))
        assert tracker.acked_plain == 1000


class _WithoutTcpInfo:
    """A socket as a kernel without ``TCP_INFO`` shows it; with ``fileno`` on another
    descriptor (``no_outq``), ``SIOCOUTQ`` fails too."""

    def __init__(self, sock: socket.socket, no_outq: int | None = None) -> None:
        self._sock = sock
        self._no_outq = no_outq

    def fileno(self) -> int:
        return self._sock.fileno() if self._no_outq is None else self._no_outq

    def getsockopt(self, level: int, option: int, *buflen: int):  # type: ignore[no-untyped-def]
        if level == socket.IPPROTO_TCP and option == getattr(socket, "TCP_INFO", None):
            raise OSError("no TCP_INFO here")
        return self._sock.getsockopt(level, option, *buflen)


def test_without_tcp_info_bytes_still_in_the_transport_are_never_counted_as_acknowledged() -> None:
    in_transport = 500  # handed to the transport, not yet to the kernel
    with connected_pair() as (sender, _receiver):
        sender.sendall(b"m" * 10_000)  # the receiver's buffer takes it all: the kernel acknowledges it
        wait_until(lambda: unacked_in_kernel(sender) == 0, "the receiver's kernel acknowledges every byte")
        sampled = _WithoutTcpInfo(sender)
        assert acked_wire_bytes(sampled, 10_000 + in_transport, in_transport) == (10_000, True)
        # neither TCP_INFO nor SIOCOUTQ (a descriptor that is not a socket): the send buffer counts as unacknowledged
        send_buffer = sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        not_a_socket = os.open(os.devnull, os.O_RDONLY)
        try:
            blind = _WithoutTcpInfo(sender, no_outq=not_a_socket)
            wire = send_buffer + 10_000 + in_transport
            assert acked_wire_bytes(blind, wire, in_transport) == (10_000, False)
        finally:
            os.close(not_a_socket)


# --- TLS ------------------------------------------------------------------------------------


def test_under_tls_the_position_is_never_past_what_was_acknowledged() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    tracker = AckTracker(overlap_bytes=0)
    tracker.start(b"c", 0)
    # ciphertext offset at which each message's record ends: the truth to compare with
    record_ends: list[tuple[int, int]] = []
    with connected_pair() as (sender, receiver):
        tls_client: list[ssl.SSLSocket] = []
        done = threading.Event()

        def client() -> None:
            s = client_ctx.wrap_socket(receiver, server_hostname="localhost", do_handshake_on_connect=False)
            s.do_handshake()
            tls_client.append(s)
            done.set()

        thread = threading.Thread(target=client)
        thread.start()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
        sender.settimeout(WAIT_S)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = outgoing.read()
                if out:
                    sender.sendall(out)
                    tracker.wrote_wire(len(out))
                incoming.write(sender.recv(65536))
        out = outgoing.read()
        sender.sendall(out)
        tracker.wrote_wire(len(out))
        assert done.wait(WAIT_S)
        thread.join(WAIT_S)
        for i in range(1, 201):
            tls.write(b"m" * MESSAGE)
            out = outgoing.read()
            sender.sendall(out)
            tracker.wrote(MESSAGE, wire_bytes=len(out), channel=b"c", position=i)
            record_ends.append((tracker.wire_written, i))
        (client_socket,) = tls_client
        got = 0
        while got < 75 * MESSAGE:
            got += len(client_socket.recv(75 * MESSAGE - got))
        for _ in range(3):  # acknowledgements move while the test samples: check each time
            tracker.sample(sender)
            acked = tcp_bytes_acked(sender)
            assert acked is not None
            truth = max((i for end, i in record_ends if end <= acked), default=0)
            assert tracker.positions()[b"c"] <= truth  # never a skip
        wait_until(lambda: tracker.sample(sender) and tracker.positions()[b"c"] >= 75, "what was read counted")
        client_socket.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_an_asyncio_transports_socket_can_be_sampled_also_after_the_peer_reset(loop_kind: str) -> None:
    import asyncio

    tracker = AckTracker(overlap_bytes=0)
    tracker.start(b"c", 0)

    async def go() -> None:
        transports: list[asyncio.Transport] = []
        lost = asyncio.get_running_loop().create_future()
        got = 0

        class Sender(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                writer = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
                transports.append(writer)
                for i in range(1, 301):
                    writer.write(b"m" * MESSAGE)
                    tracker.wrote(MESSAGE, channel=b"c", position=i)

            def connection_lost(self, exc: Exception | None) -> None:
                # the socket is still open here: the last sample is taken at close
                tracker.sample(transports[0].get_extra_info("socket"))
                lost.set_result(exc)

        loop = asyncio.get_running_loop()
        server = await loop.create_server(Sender, "127.0.0.1", 0)
        # the collector: a plain socket that reads 40 messages from its kernel and no more
        # (a StreamReader would drain the kernel's buffer into its own, and close with FIN)
        receiver = socket.socket()
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        receiver.setblocking(False)
        try:
            await loop.sock_connect(receiver, server.sockets[0].getsockname())
            async with asyncio.timeout(WAIT_S):
                while got < 40 * MESSAGE:
                    got += len(await loop.sock_recv(receiver, 40 * MESSAGE - got))
            sock = transports[0].get_extra_info("socket")  # asyncio's TransportSocket, uvloop's PseudoSocket
            deadline = time.monotonic() + WAIT_S
            while tracker.acked_plain <= 40 * MESSAGE and time.monotonic() < deadline:
                tracker.sample(sock)
                await asyncio.sleep(0.005)
            assert tracker.positions()[b"c"] >= 40
        finally:
            receiver.close()  # unread data: RST
        exc = await asyncio.wait_for(lost, WAIT_S)
        assert isinstance(exc, ConnectionResetError)
        assert 40 < tracker.positions()[b"c"] < 300  # acknowledged beyond what was read
        server.close()
        await server.wait_closed()

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(go())
    else:
        asyncio.run(go())
