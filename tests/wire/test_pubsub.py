"""End to end over loopback: our broker as a subprocess, raw sockets."""

from __future__ import annotations

import threading

import pytest

from hpfeeds3.protocol import Publish, encode_auth, encode_publish, encode_subscribe, sign
from tests.support.broker import BrokerProcess, RawClient, confirm_subscribed


def test_info_carries_name_and_four_byte_nonce(start_broker) -> None:
    b = start_broker("--name", "mybroker")
    with RawClient(b.port) as c:
        info = c.read_info()
    assert info.name == b"mybroker"
    assert len(info.nonce) == 4


def test_nonce_differs_per_connection(broker: BrokerProcess) -> None:
    nonces = set()
    for _ in range(5):
        with RawClient(broker.port) as c:
            nonces.add(c.read_info().nonce)
    assert len(nonces) == 5


def test_publish_reaches_subscriber_with_publisher_ident_unchanged(broker: BrokerProcess) -> None:
    with RawClient(broker.port) as sub, RawClient(broker.port) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", sub)  # and nothing is sent on success
        frame = encode_publish(b"alice", b"chan1", b"\x00binary\xffpayload")
        pub.send(frame)
        [msg] = sub.messages(1)
        assert msg == Publish(b"alice", b"chan1", b"\x00binary\xffpayload")


def test_publisher_subscribed_to_own_channel_gets_its_own_messages(broker: BrokerProcess) -> None:
    with RawClient(broker.port) as c:
        c.auth("alice", "alice-secret")
        c.subscribe("chan1")
        c.publish("chan1", b"echo")
        [msg] = c.messages(1)
        assert msg.payload == b"echo"


def test_pipelined_auth_subscribe_publish_in_one_segment(broker: BrokerProcess) -> None:
    with RawClient(broker.port) as c:
        info = c.read_info()
        c.send(
            encode_auth(b"alice", sign(info.nonce, b"alice-secret"))
            + encode_subscribe(b"alice", b"chan1")
            + b"".join(encode_publish(b"alice", b"chan1", str(i).encode()) for i in range(50))
        )
        msgs = c.messages(50)
        assert [m.payload for m in msgs] == [str(i).encode() for i in range(50)]


def test_pipelined_publish_with_fin_is_delivered(broker: BrokerProcess) -> None:
    import socket

    with RawClient(broker.port) as sub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        with RawClient(broker.port) as probe:
            confirm_subscribed(probe.auth("alice", "alice-secret"), "chan1", sub)
        with RawClient(broker.port) as pub:
            info = pub.read_info()
            pub.send(
                encode_auth(b"alice", sign(info.nonce, b"alice-secret"))
                + encode_publish(b"alice", b"chan1", b"then-fin")
            )
            pub.sock.shutdown(socket.SHUT_WR)
            [msg] = sub.messages(1)
            assert msg.payload == b"then-fin"


def test_a_subscriber_that_arrives_after_a_publish_gets_the_next_messages(broker: BrokerProcess) -> None:
    """The channel's fan-out is built by the first publish; a later SUBSCRIBE must join it."""
    with RawClient(broker.port) as first, RawClient(broker.port) as late, RawClient(broker.port) as pub:
        first.auth("bob", "bob-secret")
        first.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", first)
        pub.publish("chan1", b"before")
        assert first.messages(1)[0].payload == b"before"
        late.auth("reader", "reader-secret")
        late.subscribe("chan1")
        confirm_subscribed(pub, "chan1", first, late)
        pub.publish("chan1", b"after")
        assert first.messages(1)[0].payload == late.messages(1)[0].payload == b"after"


def test_unsubscribe_stops_delivery(broker: BrokerProcess) -> None:
    with RawClient(broker.port) as sub, RawClient(broker.port) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", sub)
        pub.publish("chan1", b"one")
        assert sub.messages(1)[0].payload == b"one"
        # Frames of one connection are handled in order: once the chan2 probe
        # arrives, the UNSUBSCRIBE before it is done.
        sub.unsubscribe("chan1")
        sub.subscribe("chan2")
        confirm_subscribed(pub, "chan2", sub)
        pub.publish("chan1", b"two")
        confirm_subscribed(pub, "chan2", sub)  # "two" would have come before this probe


def test_100k_messages_to_three_subscribers_in_order(broker: BrokerProcess) -> None:
    n = 100_000
    subs = [RawClient(broker.port, timeout=30) for _ in range(3)]
    for s in subs:
        s.auth("bob", "bob-secret")
        s.subscribe("chan1")
    with RawClient(broker.port) as probe:
        confirm_subscribed(probe.auth("alice", "alice-secret"), "chan1", *subs)
    results: dict[int, list[int]] = {}

    def read(i: int, s: RawClient) -> None:
        results[i] = [int(m.payload) for m in s.messages(n, timeout=60)]

    threads = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(subs)]
    for t in threads:
        t.start()
    with RawClient(broker.port) as pub:
        pub.auth("alice", "alice-secret")
        frames = [encode_publish(b"alice", b"chan1", str(i).encode()) for i in range(n)]
        for chunk in range(0, n, 1000):
            pub.send(b"".join(frames[chunk : chunk + 1000]))
        for t in threads:
            t.join(90)
    for s in subs:
        s.close()
    assert sorted(results) == [0, 1, 2]
    for got in results.values():
        assert got == list(range(n))


@pytest.mark.parametrize("payload_size", [0, 1, 65536, 1024 * 1024 - 32])
def test_payload_sizes_up_to_the_limit(broker: BrokerProcess, payload_size: int) -> None:
    with RawClient(broker.port) as c:
        c.auth("alice", "alice-secret")
        c.subscribe("chan1")
        payload = bytes(range(256)) * (payload_size // 256) + b"x" * (payload_size % 256)
        c.publish("chan1", payload)
        [msg] = c.messages(1)
        assert msg.payload == payload
