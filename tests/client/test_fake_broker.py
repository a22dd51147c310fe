"""The asyncio client against scripted brokers in this process, speaking bytes.

These cover what real brokers do rarely or never: hostile frames, ERROR
before INFO, silence, a close after a limit, a flood of messages.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from hpfeeds3.client import Backoff, BrokerError, Client, ClientClosed, ConnectionLost, Message
from hpfeeds3.client.backoff import Backoff as BackoffClass
from hpfeeds3.client.errors import AccessDenied, AuthenticationFailed, classify
from hpfeeds3.protocol import (
    Auth,
    Decoder,
    Frame,
    Publish,
    Subscribe,
    encode_error,
    encode_info,
    encode_publish,
    verify,
)
from tests.support.reference import HOST

TIMEOUT_S = 10.0
FAST = Backoff(initial_s=0.02, max_s=0.05)
NONCE = b"\x01\x02\x03\x04"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    """A server calling ``handler(reader, writer, n)`` for its n-th connection (0-based)."""
    count = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        n, count = count, count + 1
        try:
            await handler(reader, writer, n)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_frames(reader: asyncio.StreamReader, n: int) -> list[Frame]:
    decoder = Decoder.for_broker()
    frames: list[Frame] = []
    async with asyncio.timeout(TIMEOUT_S):
        while len(frames) < n:
            data = await reader.read(65536)
            assert data, f"client closed after {frames}"
            frames += decoder.feed(data)  # type: ignore[arg-type]  # no runs: runs=False
    return frames


async def _wait_closed(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while await reader.read(65536):
            pass


def test_handshake_pipelines_auth_subscribes_and_queued_publishes_in_order() -> None:
    seen: list[Frame] = []

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(encode_info(b"fake", NONCE))
        seen.extend(await _read_frames(reader, 5))
        await _wait_closed(reader)

    async def scenario() -> None:
        server, port = await _serve(broker)
        client = Client(HOST, port, "sensor", "s3cret")
        await client.subscribe("a", "b")
        await client.publish("a", b"p1")
        await client.publish("b", "p2")
        await client.connect()
        assert client.broker_name == "fake"
        await client.flush()
        async with asyncio.timeout(TIMEOUT_S):
            while len(seen) < 5:
                await asyncio.sleep(0.01)
        await client.close()
        server.close()

    asyncio.run(scenario())
    auth = seen[0]
    assert isinstance(auth, Auth) and auth.ident == b"sensor" and verify(NONCE, b"s3cret", auth.digest)
    assert seen[1:] == [
        Subscribe(b"sensor", b"a"),
        Subscribe(b"sensor", b"b"),
        Publish(b"sensor", b"a", b"p1"),
        Publish(b"sensor", b"b", b"p2"),
    ]


def test_close_before_info_is_connection_lost() -> None:
    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        pass

    async def scenario() -> None:
        server, port = await _serve(broker)
        with pytest.raises(ConnectionLost, match="before the broker's INFO"):
            await Client(HOST, port, "sensor", "s").connect()
        server.close()

    asyncio.run(scenario())


def test_error_before_info_is_raised_by_connect() -> None:
    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(encode_error("limit: too many connections"))

    async def scenario() -> None:
        server, port = await _serve(broker)
        with pytest.raises(BrokerError, match="too many connections"):
            await Client(HOST, port, "sensor", "s").connect()
        server.close()

    asyncio.run(scenario())


def test_silent_broker_times_out_the_connect() -> None:
    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _wait_closed(reader)

    async def scenario() -> None:
        server, port = await _serve(broker)
        with pytest.raises(TimeoutError):
            await Client(HOST, port, "sensor", "s", connect_timeout_s=0.2).connect()
        server.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x02\x03", b"\x00\x00\x00\x06\x07x", b"\x7f\xff\xff\xff\x03", b"\x00\x00\x00\x06\x02x"],
    ids=["length-below-header", "unknown-opcode", "huge-length", "auth-from-broker"],
)
def test_protocol_violation_closes_and_reconnects(garbage: bytes) -> None:
    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(encode_info(b"fake", NONCE))
        await _read_frames(reader, 2)  # AUTH, SUBSCRIBE
        if n == 0:
            writer.write(garbage)
            await _wait_closed(reader)  # the client hangs up on it
        else:
            writer.write(encode_publish(b"other", b"a", b"fine"))
            await _wait_closed(reader)

    async def scenario() -> None:
        server, port = await _serve(broker)
        client = Client(HOST, port, "sensor", "s", backoff=FAST)
        await client.subscribe("a")
        await client.connect()
        async with asyncio.timeout(TIMEOUT_S):
            assert await client.__anext__() == Message("other", "a", b"fine")
        assert client.connection_count == 2
        await client.close()
        server.close()

    asyncio.run(scenario())


def test_limit_error_then_close_is_reported_and_not_fatal() -> None:
    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(encode_info(b"fake", NONCE))
        await _read_frames(reader, 1)
        if n == 0:
            writer.write(encode_error("limit: outgoing buffer over its hard bound"))
        else:
            writer.write(encode_publish(b"other", b"a", b"back"))
            await _wait_closed(reader)

    async def scenario() -> None:
        server, port = await _serve(broker)
        client = Client(HOST, port, "sensor", "s", backoff=FAST)
        await client.connect()
        async with asyncio.timeout(TIMEOUT_S):
            with pytest.raises(BrokerError, match="limit:") as info:
                await client.__anext__()
            assert type(info.value) is BrokerError
            assert (await client.__anext__()).payload == b"back"
        await client.close()
        server.close()

    asyncio.run(scenario())


def test_slow_reader_pauses_the_socket_and_loses_nothing() -> None:
    total = 3000

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(encode_info(b"fake", NONCE))
        await _read_frames(reader, 1)
        for i in range(total):
            writer.write(encode_publish(b"other", b"a", b"%d" % i + b"." * 1000))
            await writer.drain()
        await _wait_closed(reader)

    async def scenario() -> None:
        server, port = await _serve(broker)
        client = Client(HOST, port, "sensor", "s", max_buffered_messages=50)
        await client.connect()
        got: list[int] = []
        async with asyncio.timeout(TIMEOUT_S):
            while len(got) < total:
                if len(got) % 500 == 0:
                    await asyncio.sleep(0.05)  # let the buffer fill up and reading pause
                    # Bounded: at most one socket read (256 KiB, ~260 messages) beyond the bound.
                    assert len(client._inbox) <= 50 + 300
                message = await client.__anext__()
                got.append(int(message.payload.split(b".")[0]))
        assert got == list(range(total))
        await client.close()
        server.close()

    asyncio.run(scenario())


def test_backoff_doubles_to_its_cap_with_bounded_jitter() -> None:
    b = BackoffClass(initial_s=0.5, max_s=4.0, factor=2.0, jitter=0.5)
    assert [b.base(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.base(10_000) == 4.0
    rng = random.Random(7)
    delays = [b.delay(3, rng) for _ in range(1000)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert max(delays) - min(delays) > 1.5  # really jittered
    with pytest.raises(ValueError):
        BackoffClass(initial_s=0)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Authentication failed for bob", AuthenticationFailed),
        ("authfail: Authentication failed for bob", AuthenticationFailed),
        ("authfail: Authentication failed for bob: the key store is unavailable, try again later", BrokerError),
        ("Authkey not allowed to sub here. ident=bob, chan=x", AccessDenied),
        ("accessfail: bob may not publish to channel 'x'", AccessDenied),
        ("limit: too many connections", BrokerError),
    ],
)
def test_error_texts_of_both_brokers_are_classified(text: str, kind: type[BrokerError]) -> None:
    err = classify(text)
    assert type(err) is kind and err.message == text == str(err)


def test_wait_ready_during_connect_shares_the_connection_and_close_leaks_none() -> None:
    connections = 0

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal connections
        connections += 1
        await asyncio.sleep(0.2)  # a slow INFO
        writer.write(encode_info(b"fake", NONCE))
        await _wait_closed(reader)

    async def scenario() -> None:
        server, port = await _serve(broker)
        client = Client(HOST, port, "sensor", "s")
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.gather(client.connect(), client.wait_ready(0.05))
        assert connections == 1 and client.connection_count == 1
        await client.close()

        # Closed while its connection is still being opened: nothing stays open.
        late = Client(HOST, port, "sensor", "s")
        connecting = asyncio.ensure_future(late.connect())
        await asyncio.sleep(0.05)
        await late.close()
        with pytest.raises((ClientClosed, asyncio.CancelledError)):
            async with asyncio.timeout(TIMEOUT_S):
                await connecting
        assert late._conn is None and not late.connected
        server.close()

    asyncio.run(scenario())


def test_wait_ready_while_a_refused_connection_closes_does_not_connect_again() -> None:
    """A broker refuses the AUTH with a "try again" ERROR (an address blocked after
    failed logins) and closes. ``wait_ready`` called in the moment between that close
    being read and ``connection_lost`` (the transport closing, the client not yet told)
    waits for the loss and raises it: without reconnect it opens no second connection,
    whose AUTH the broker would count as one more failed login (the console showed 2
    where one was made)."""

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(encode_info(b"fake", NONCE))
        await _read_frames(reader, 1)
        writer.write(encode_error("Authentication failed for sensor: too many failed attempts, try again in 300 s"))

    async def scenario() -> None:
        server, port = await _serve(broker)
        client = Client(HOST, port, "sensor", "s", reconnect=False)
        async with asyncio.timeout(TIMEOUT_S):
            await client.connect()
            conn = client._conn
            assert conn is not None and conn.transport is not None
            while not conn.transport.is_closing():  # the broker's close read; connection_lost is next
                await asyncio.sleep(0)
            with pytest.raises((BrokerError, ConnectionLost)):
                await client.wait_ready(0.5)
        assert client.connection_count == 1
        await client.close()
        server.close()

    asyncio.run(scenario())
