"""Reconnect: the broker is killed and started again while clients run."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import pytest

from hpfeeds3.client import Backoff, Client, ConnectionLost, Message, PublishQueueFull, make_ssl_context
from tests.client.brokers import KINDS, TESTER, BrokerPool, client_for
from tests.support.reference import HOST

TIMEOUT_S = 20.0
FAST = Backoff(initial_s=0.05, max_s=0.2)


class Gate:
    """A TCP forwarder in front of the broker that the test can shut.

    While shut it accepts and at once closes, like a broker that is not
    there yet. The test uses it to let the publisher back only after the
    subscriber re-subscribed, so "delivered" is decided by the client, not by
    which of two reconnects wins a race.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.shut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()

    def drop(self) -> None:
        """Cut every connection through the gate (the broker stays up)."""
        for w in list(self._writers):
            w.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.shut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {TIMEOUT_S} s: {what}") from None


async def _take(client: Client, n: int) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(TIMEOUT_S):
        while len(out) < n:
            out.append(await client.__anext__())
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_broker_restart_resubscribes_and_delivers_or_reports_outage_messages(
    kind: str, broker_pool: BrokerPool, channel: str
) -> None:
    broker = broker_pool.new(kind, False, f"restart-{kind}")
    broker.start()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gate = Gate(broker.port)
        await gate.start()
        sub = client_for(broker, backoff=FAST)
        pub = Client(HOST, gate.port, *TESTER, backoff=FAST, max_pending=5)
        try:
            await sub.subscribe(channel)
            await sub.connect()
            await sub.wait_ready(0.2)
            await pub.connect()
            await pub.publish(channel, "before")
            assert [m.payload for m in await _take(sub, 1)] == [b"before"]

            await loop.run_in_executor(None, broker.kill)
            await _until(lambda: not sub.connected and not pub.connected, "both clients notice the loss")
            gate.shut = True

            # During the outage: five publishes are queued, the rest are refused.
            refused = []
            for i in range(8):
                try:
                    await pub.publish(channel, f"outage-{i}")
                except PublishQueueFull:
                    refused.append(i)
            assert refused == [5, 6, 7]
            assert pub.pending == 5

            await loop.run_in_executor(None, broker.start)
            await _until(lambda: sub.connected and sub.connection_count == 2, "the subscriber reconnects")
            await sub.wait_ready(0.3)  # its SUBSCRIBE was written on reconnect; nothing refused it
            gate.shut = False

            await pub.flush(TIMEOUT_S)  # waits through the publisher's reconnect
            assert pub.connection_count >= 2 and pub.pending == 0
            for i in range(3):
                await pub.publish(channel, f"after-{i}")

            got = [m.payload.decode() for m in await _take(sub, 8)]
            # Every queued outage message, in order, then every later one; none of the refused.
            assert got == [f"outage-{i}" for i in range(5)] + [f"after-{i}" for i in range(3)]
        finally:
            await sub.close()
            await pub.close()
            await gate.close()

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()


def test_without_reconnect_a_lost_connection_is_fatal(broker_pool: BrokerPool, channel: str) -> None:
    broker = broker_pool.new("hpfeeds3", False, "no-reconnect")
    broker.start()

    async def scenario() -> None:
        client = client_for(broker, reconnect=False)
        await client.connect()
        await asyncio.get_running_loop().run_in_executor(None, broker.kill)
        await _until(lambda: not client.connected, "the client notices")
        with pytest.raises(ConnectionLost):
            await client.publish(channel, b"x")
        with pytest.raises(ConnectionLost):
            await client.__anext__()
        assert await client.close() == 0

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()


def test_connect_retry_waits_for_a_broker_that_starts_late(broker_pool: BrokerPool, channel: str) -> None:
    broker = broker_pool.new("hpfeeds3", False, "late")

    async def scenario() -> None:
        client = client_for(broker, backoff=FAST)
        with pytest.raises(ConnectionRefusedError):
            await client.connect()
        connecting = asyncio.ensure_future(client.connect(retry=True))
        await asyncio.sleep(0.3)
        assert not connecting.done()
        await asyncio.get_running_loop().run_in_executor(None, broker.start)
        async with asyncio.timeout(TIMEOUT_S):
            await connecting
        await client.subscribe(channel)
        await client.publish(channel, b"late")
        assert (await _take(client, 1))[0].payload == b"late"
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_a_tls_reconnect_resumes_the_previous_session(
    version: ssl.TLSVersion, broker_pool: BrokerPool, channel: str
) -> None:
    broker = broker_pool.get("hpfeeds3", tls=True)

    async def scenario() -> None:
        gate = Gate(broker.port)
        await gate.start()
        ctx = make_ssl_context(str(broker.tls_ca))
        ctx.minimum_version = ctx.maximum_version = version
        client = Client(HOST, gate.port, *TESTER, ssl_context=ctx, server_hostname="localhost", backoff=FAST)
        try:
            await client.subscribe(channel)
            await client.connect()
            assert client.tls_session_reused is False  # nothing to resume yet
            for n in (2, 3):
                gate.drop()
                await _until(lambda: client.connected and client.connection_count == n, f"reconnect {n}")  # noqa: B023
                assert client.tls_session_reused is True, f"reconnect {n} made a full handshake"
            await client.publish(channel, b"over the resumed session")
            assert (await _take(client, 1))[0].payload == b"over the resumed session"
        finally:
            await client.close()
            await gate.close()

    asyncio.run(scenario())


def test_tls_resumption_can_be_turned_off(broker_pool: BrokerPool) -> None:
    broker = broker_pool.get("hpfeeds3", tls=True)

    async def scenario() -> None:
        gate = Gate(broker.port)
        await gate.start()
        client = Client(
            HOST,
            gate.port,
            *TESTER,
            cafile=str(broker.tls_ca),
            server_hostname="localhost",
            backoff=FAST,
            tls_resumption=False,
        )
        try:
            await client.connect()
            gate.drop()
            await _until(lambda: client.connected and client.connection_count == 2, "the reconnect")
            assert client.tls_session_reused is False
        finally:
            await client.close()
            await gate.close()

    asyncio.run(scenario())
