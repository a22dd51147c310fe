"""The asyncio and blocking clients against real brokers (ours and the reference)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hpfeeds3.client import (
    AccessDenied,
    AuthenticationFailed,
    BlockingClient,
    Client,
    Message,
    PublishQueueFull,
)
from tests.client.brokers import LIMITED, TESTER, client_for
from tests.support.reference import Broker

TIMEOUT_S = 15.0
BINARY = bytes(range(256)) * 4 + b"\x00\xff"


async def _take(client: Client, n: int) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(TIMEOUT_S):
        async for message in client:
            out.append(message)
            if len(out) == n:
                break
    return out


def test_publish_subscribe_round_trip_text_and_binary(any_broker: Broker, channel: str) -> None:
    async def scenario() -> None:
        async with client_for(any_broker) as sub, client_for(any_broker) as pub:
            await sub.subscribe(channel)
            await sub.wait_ready(0.2)
            assert sub.broker_name  # from INFO
            await pub.publish(channel, "héllo wörld")
            await pub.publish(channel, BINARY)
            await pub.publish(channel.encode(), b"")
            await pub.flush()
            got = await _take(sub, 3)
            assert got == [
                Message("tester", channel, "héllo wörld".encode()),
                Message("tester", channel, BINARY),
                Message("tester", channel, b""),
            ]

    asyncio.run(scenario())


def test_several_channels_and_unsubscribe(plain_broker: Broker, broker_pool: object) -> None:
    from tests.client.brokers import BrokerPool

    assert isinstance(broker_pool, BrokerPool)
    a, b = broker_pool.channel(), broker_pool.channel()

    async def scenario() -> None:
        async with client_for(plain_broker) as sub, client_for(plain_broker) as pub:
            await sub.subscribe(a, b, a)  # a duplicate is a no-op
            await sub.wait_ready(0.2)
            assert sub.subscriptions == [a, b]
            await pub.publish(a, b"1")
            await pub.publish(b, b"2")
            assert [(m.channel, m.payload) for m in await _take(sub, 2)] == [(a, b"1"), (b, b"2")]
            await sub.unsubscribe(b)
            await sub.wait_ready(0.2)
            await pub.publish(b, b"gone")
            await pub.publish(a, b"3")
            assert [(m.channel, m.payload) for m in await _take(sub, 1)] == [(a, b"3")]

    asyncio.run(scenario())


def test_publisher_subscribed_to_its_channel_gets_its_own_messages(plain_broker: Broker, channel: str) -> None:
    async def scenario() -> None:
        async with client_for(plain_broker) as client:
            await client.subscribe(channel)
            await client.publish(channel, b"echo")
            assert await _take(client, 1) == [Message("tester", channel, b"echo")]

    asyncio.run(scenario())


def test_publishes_before_connect_are_sent_after_auth_in_order(plain_broker: Broker, channel: str) -> None:
    async def scenario() -> None:
        async with client_for(plain_broker) as sub:
            await sub.subscribe(channel)
            await sub.wait_ready(0.2)
            pub = client_for(plain_broker, max_pending=5)
            for i in range(5):
                await pub.publish(channel, str(i))
            assert pub.pending == 5
            with pytest.raises(PublishQueueFull):
                await pub.publish(channel, "6")
            await pub.connect()
            assert pub.pending == 0
            await pub.flush()
            assert [m.payload for m in await _take(sub, 5)] == [b"0", b"1", b"2", b"3", b"4"]
            assert await pub.close() == 0

    asyncio.run(scenario())


def test_wrong_secret_raises_authentication_failed_and_is_fatal(plain_broker: Broker, channel: str) -> None:
    async def scenario() -> None:
        client = client_for(plain_broker, key=(TESTER[0], "wrong"))
        await client.connect()
        with pytest.raises(AuthenticationFailed) as info:
            await client.wait_ready(2.0)
        assert "tester" in info.value.message
        # Fatal: no reconnect, and every later call says why.
        with pytest.raises(AuthenticationFailed):
            await client.publish(channel, b"x")
        with pytest.raises(AuthenticationFailed):
            await client.__anext__()
        await client.close()

    asyncio.run(scenario())


def test_denied_subscribe_raises_access_denied(plain_broker: Broker, channel: str) -> None:
    async def scenario() -> None:
        async with client_for(plain_broker, key=LIMITED) as client:
            await client.subscribe("allowed", channel)
            with pytest.raises(AccessDenied) as info:
                await client.wait_ready(2.0)
            assert channel in info.value.message
            if plain_broker.kind == "hpfeeds3":
                # Ours keeps the connection: the permitted channel still works.
                await client.publish("allowed", b"still here")
                assert (await _take(client, 1))[0].payload == b"still here"
            else:
                # The reference closes it; reconnecting would repeat the refusal.
                with pytest.raises(AccessDenied):
                    await client.wait_ready(2.0)
                assert not client.connected

    asyncio.run(scenario())


def test_on_error_callback_gets_the_broker_text(plain_broker: Broker, channel: str) -> None:
    errors: list[Exception] = []

    async def scenario() -> None:
        async with client_for(plain_broker, key=LIMITED, on_error=errors.append) as client:
            await client.publish(channel, b"nope")
            await client.flush()
            # Handed to the callback, so not raised here.
            async with asyncio.timeout(TIMEOUT_S):
                while not errors:
                    await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert len(errors) == 1 and isinstance(errors[0], AccessDenied)
    assert channel in str(errors[0])


def test_message_over_the_frame_limit_is_refused_before_sending(plain_broker: Broker, channel: str) -> None:
    async def scenario() -> None:
        async with client_for(plain_broker) as client:
            with pytest.raises(ValueError, match="exceeds"):
                await client.publish(channel, bytes(1024 * 1024 + 1))
            with pytest.raises(ValueError):
                await client.publish("c" * 256, b"x")

    asyncio.run(scenario())


def test_blocking_client_iterator_and_thread_safe_publish(any_broker: Broker, channel: str) -> None:
    kwargs = {"cafile": str(any_broker.tls_ca)} if any_broker.tls else {}
    with (
        BlockingClient(any_broker.host, any_broker.port, *TESTER, **kwargs) as sub,
        BlockingClient(any_broker.host, any_broker.port, *TESTER, **kwargs) as pub,
    ):
        sub.subscribe(channel)
        sub.wait_ready(0.2)

        def publish_many(thread: int) -> None:
            for i in range(200):
                pub.publish(channel, f"{thread}:{i}")

        threads = [threading.Thread(target=publish_many, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
        pub.flush(TIMEOUT_S)

        got: dict[str, list[int]] = {str(t): [] for t in range(4)}
        for _ in range(800):
            message = sub.get(TIMEOUT_S)
            assert message is not None
            thread, i = message.payload.decode().split(":")
            got[thread].append(int(i))
        # Each thread's messages arrive in the order it published them.
        assert all(seq == list(range(200)) for seq in got.values())
        assert sub.get(0.1) is None


def test_blocking_client_run_calls_back_until_closed(plain_broker: Broker, channel: str) -> None:
    received: list[Message] = []
    with BlockingClient(plain_broker.host, plain_broker.port, *TESTER) as client:
        client.subscribe(channel)
        client.wait_ready(0.2)
        for i in range(3):
            client.publish(channel, str(i))

        def on_message(message: Message) -> None:
            received.append(message)
            if len(received) == 3:
                threading.Thread(target=client.close).start()

        runner = threading.Thread(target=client.run, args=(on_message,))
        runner.start()
        runner.join(TIMEOUT_S)
        assert not runner.is_alive()
    assert [m.payload for m in received] == [b"0", b"1", b"2"]


def test_blocking_client_auth_failure(plain_broker: Broker) -> None:
    client = BlockingClient(plain_broker.host, plain_broker.port, TESTER[0], "wrong")
    try:
        client.connect()
        with pytest.raises(AuthenticationFailed):
            client.wait_ready(2.0)
    finally:
        client.close()
