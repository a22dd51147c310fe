"""Every row of "Our decisions" and every bad input: an ERROR and/or a close,
the broker stays up, and a fresh client still gets its messages."""

from __future__ import annotations

import contextlib

import pytest

from hpfeeds3.protocol import HEADER, encode_auth, encode_publish, encode_subscribe, sign
from tests.conftest import USERS
from tests.support.broker import BrokerProcess, RawClient, confirm_subscribed


def assert_broker_still_serves(broker: BrokerProcess) -> None:
    with RawClient(broker.port) as c:
        c.auth("alice", "alice-secret")
        c.subscribe("chan2")
        c.publish("chan2", b"still here")
        assert c.messages(1)[0].payload == b"still here"


@pytest.mark.parametrize(
    ("ident", "secret"),
    [("alice", "wrong"), ("nobody", "whatever")],
    ids=["wrong-secret", "unknown-ident"],
)
def test_auth_failure_same_text_for_unknown_ident_and_wrong_secret(broker, ident, secret) -> None:
    with RawClient(broker.port) as c:
        c.auth(ident, secret)
        frames = c.expect_closed()
    assert [f.message for f in frames] == [f"authfail: Authentication failed for {ident}"]
    broker.wait_log("auth_failed")
    assert_broker_still_serves(broker)


def test_first_frame_not_auth_is_refused(broker) -> None:
    with RawClient(broker.port) as c:
        c.read_info()
        c.send(encode_subscribe(b"alice", b"chan1"))
        frames = c.expect_closed()
    assert frames[0].message.startswith("authfail: first message was not AUTH")
    broker.wait_log("not_authenticated")
    assert_broker_still_serves(broker)


def test_second_auth_is_refused_and_closes(broker) -> None:
    with RawClient(broker.port) as c:
        c.auth("alice", "alice-secret")
        c.send(encode_auth(b"alice", sign(c.info.nonce, b"alice-secret")))
        frames = c.expect_closed()
    assert frames[0].message.startswith("protocolfail: already authenticated")
    broker.wait_log("second_auth")


def test_denied_subscribe_gets_error_and_connection_stays_open(broker) -> None:
    with RawClient(broker.port) as c:
        c.auth("reader", "reader-secret")
        c.subscribe("private", "chan1")  # a consumer keeps the channels it may read
        assert c.expect_error() == "accessfail: reader may not subscribe to channel 'private'"
        with RawClient(broker.port) as pub:
            pub.auth("alice", "alice-secret")
            confirm_subscribed(pub, "chan1", c)  # nothing else came
            pub.publish("chan1", b"allowed")
        assert c.messages(1)[0].payload == b"allowed"


def test_a_key_may_not_subscribe_to_a_channel_it_may_only_publish_to(start_broker) -> None:
    sensor = {"secret": "sensor-secret", "pubchans": ["events", "status"], "subchans": ["status"]}
    b = start_broker(users={**USERS, "sensor": sensor})
    with RawClient(b.port) as c:
        c.auth("sensor", "sensor-secret")
        c.subscribe("events")
        c.publish("events", b"not for the sensor")
        c.subscribe("status")
        c.publish("status", b"after")  # frames of one connection are handled in order
        assert c.expect_error() == "accessfail: sensor may not subscribe to channel 'events'"
        assert [m.payload for m in c.messages(1)] == [b"after"]


def test_denied_publish_has_no_effect_and_connection_stays_open(broker) -> None:
    with RawClient(broker.port) as sub, RawClient(broker.port) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan2", "chan1")
        pub.auth("bob", "bob-secret")
        confirm_subscribed(pub, "chan1", sub)
        pub.publish("chan2", b"denied")  # bob may read chan2 but not publish there
        assert pub.expect_error() == "accessfail: bob may not publish to channel 'chan2'"
        pub.publish("chan1", b"ok")
        assert [m.payload for m in sub.messages(1)] == [b"ok"]


def test_spoofed_ident_is_dropped_and_connection_stays_open(broker) -> None:
    with RawClient(broker.port) as sub, RawClient(broker.port) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", sub)
        pub.send(encode_publish(b"bob", b"chan1", b"spoof"))
        assert pub.expect_error().startswith("identfail: publish as 'bob' refused")
        pub.publish("chan1", b"genuine")
        [msg] = sub.messages(1)
        assert (msg.ident, msg.payload) == (b"alice", b"genuine")


def test_denials_over_the_cap_close_the_connection(start_broker) -> None:
    b = start_broker("--max-denials", "5")
    with RawClient(b.port) as c:
        c.auth("reader", "reader-secret")
        for _ in range(6):
            c.subscribe("private")
        frames = c.expect_closed()
    assert len(frames) == 6
    assert frames[-1].message.startswith("limit: more than 5 refused frames")
    b.wait_log("too_many_denials")


def test_duplicate_subscribe_and_stray_unsubscribe_are_idempotent(broker) -> None:
    with RawClient(broker.port) as c:
        c.auth("alice", "alice-secret")
        c.unsubscribe("chan1")
        c.subscribe("chan1", "chan1", "chan1")
        c.publish("chan1", b"once")
        assert c.messages(1)[0].payload == b"once"
        c.publish("chan1", b"next")  # on one connection, after any second "once" or ERROR
        assert c.messages(1)[0].payload == b"next"


def test_invalid_utf8_ident_fails_auth_like_any_unknown_ident(broker) -> None:
    with RawClient(broker.port) as c:
        info = c.read_info()
        c.send(encode_auth(b"\xff\xfe", sign(info.nonce, b"x")))
        frames = c.expect_closed()
    assert frames[0].message == "authfail: Authentication failed for \\xff\\xfe"
    assert_broker_still_serves(broker)


def test_invalid_utf8_channel_is_denied_not_crashing(broker) -> None:
    with RawClient(broker.port) as c:
        c.auth("alice", "alice-secret")
        c.send(encode_subscribe(b"alice", b"\xff\xfe"))
        assert c.expect_error().startswith("accessfail: alice may not subscribe to channel")
    assert_broker_still_serves(broker)


BAD_FRAMES = {
    "length-below-header": (HEADER.pack(0, 3), "bad_frame"),
    "length-4": (HEADER.pack(4, 3), "bad_frame"),
    "length-2**31": (HEADER.pack(2**31, 3), "frame_too_large"),
    "publish-over-cap": (HEADER.pack(5 + 1024 * 1024 + 1, 3), "frame_too_large"),
    "unknown-opcode": (HEADER.pack(6, 77) + b"x", "bad_frame"),
    "client-info": (HEADER.pack(10, 1) + b"\x01n1234", "bad_frame"),
    "client-error": (HEADER.pack(8, 0) + b"err", "bad_frame"),
    "str8-past-end": (HEADER.pack(9, 3) + b"\x09abc", "bad_frame"),
    "empty-channel": (HEADER.pack(5 + 6 + 1 + 1, 3) + b"\x05alice\x00x", "bad_frame"),
    "subscribe-over-cap": (HEADER.pack(1000, 4), "frame_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_after_auth_gets_error_and_close(broker, name) -> None:
    data, reason = BAD_FRAMES[name]
    with RawClient(broker.port) as c:
        c.auth("alice", "alice-secret")
        c.send(data)
        frames = c.expect_closed(timeout=2)
    assert len(frames) == 1 and frames[0].message.split(":")[0] in ("protocolfail", "limit"), frames
    broker.wait_log(f": {reason}")
    assert_broker_still_serves(broker)


@pytest.mark.parametrize(
    "data",
    [
        HEADER.pack(0, 2),  # the 5 bytes that hang the reference broker forever
        HEADER.pack(2**31, 2),
        HEADER.pack(5 + 1 + 1 + 19, 2) + b"\x01a" + b"d" * 19,  # digest not 20 bytes
        HEADER.pack(5 + 1 + 20, 2) + b"\x00" + b"d" * 20,  # empty ident
    ],
    ids=["length-0", "length-2**31", "digest-19", "empty-ident"],
)
def test_bad_auth_frames_get_error_and_close(broker, data) -> None:
    with RawClient(broker.port) as c:
        c.read_info()
        c.send(data)
        frames = c.expect_closed(timeout=2)
    assert len(frames) == 1
    assert_broker_still_serves(broker)


def test_silent_client_is_closed_at_the_auth_deadline(broker) -> None:
    with RawClient(broker.port) as c:
        c.read_info()
        frames = c.expect_closed(timeout=3)  # --auth-timeout 1 in the fixture
    assert frames[0].message.startswith("authfail: no valid AUTH within 1 s")
    broker.wait_log("auth_timeout")


def test_max_message_size_flag(start_broker) -> None:
    b = start_broker("--max-message-size", "1000")
    with RawClient(b.port) as c:
        c.auth("alice", "alice-secret")
        c.subscribe("chan1")
        c.publish("chan1", b"x" * 900)
        assert len(c.messages(1)[0].payload) == 900
        c.publish("chan1", b"x" * 1000)
        frames = c.expect_closed()
    assert frames[0].message.startswith("limit: frame of 1017 bytes for opcode 3 exceeds the limit of 1005 bytes")


def test_connection_cap_refuses_with_error(start_broker) -> None:
    b = start_broker("--max-connections", "2")
    with RawClient(b.port) as c1, RawClient(b.port) as c2:
        c1.auth("alice", "alice-secret")
        c2.auth("bob", "bob-secret")
        c1.subscribe("chan1")
        c2.subscribe("chan1")
        confirm_subscribed(c1, "chan1", c1, c2)
        with RawClient(b.port) as c3:
            frames = c3.expect_closed()
        assert frames[-1].message == "limit: too many connections (limit 2)"
        c1.publish("chan1", b"still served")
        assert c2.messages(1)[0].payload == b"still served"


def connected_in_turn(port: int, n: int, stack: contextlib.ExitStack) -> list[RawClient]:
    """``n`` connections, each connected once the one before has its INFO: the broker
    sees them in this order. (Connections made at the same moment land in different
    listen queues, four per endpoint, and are accepted in whatever order the queues
    are read: "the oldest" of them is not defined.)"""
    clients = []
    for _ in range(n):
        client = stack.enter_context(RawClient(port))
        client.read_info()
        clients.append(client)
    return clients


def test_unauthenticated_cap_closes_the_oldest_and_admits_the_newcomer(start_broker) -> None:
    b = start_broker("--max-unauthenticated", "2", "--auth-timeout", "5")
    with contextlib.ExitStack() as stack:
        c1, c2 = connected_in_turn(b.port, 2, stack)
        with RawClient(b.port) as c3:
            c3.auth("alice", "alice-secret")
            frames = c1.expect_closed()
            assert frames[-1].message == (  # type: ignore[union-attr]
                "limit: too many unauthenticated connections (limit 2): the oldest is closed"
            )
            c3.subscribe("chan1")
            c3.publish("chan1", b"fine")
            assert c3.messages(1)[0].payload == b"fine"
        c2.auth("alice", "alice-secret")
        c2.subscribe("chan1")
        c2.publish("chan1", b"also fine")
        assert c2.messages(1)[0].payload == b"also fine"


def test_unauthenticated_cap_spares_the_oldest_while_its_auth_is_arriving(start_broker) -> None:
    """The oldest connection has sent half its AUTH (a sensor on a slow link): it is
    making progress, so at the bound the oldest silent one is closed instead, and the
    first finishes its AUTH."""
    b = start_broker("--max-unauthenticated", "8", "--auth-timeout", "10")
    with contextlib.ExitStack() as stack:
        (slow,) = connected_in_turn(b.port, 1, stack)
        assert slow.info is not None
        frame = encode_auth(b"alice", sign(slow.info.nonce, b"alice-secret"))
        slow.send(frame[:7])
        silent = connected_in_turn(b.port, 7, stack)
        with RawClient(b.port) as newcomer:
            newcomer.read_info()
            frames = silent[0].expect_closed()
            assert frames[-1].message == (  # type: ignore[union-attr]
                "limit: too many unauthenticated connections (limit 8): the oldest is closed"
            )
        slow.send(frame[7:])
        slow.ident = b"alice"
        slow.subscribe("chan1")
        slow.publish("chan1", b"made it")
        assert slow.messages(1)[0].payload == b"made it"


def test_unauthenticated_cap_per_address_closes_that_address_oldest(start_broker) -> None:
    b = start_broker("--max-unauthenticated-per-address", "2", "--auth-timeout", "5")
    with contextlib.ExitStack() as stack:
        c1, _c2, c3 = connected_in_turn(b.port, 3, stack)
        frames = c1.expect_closed()
        assert frames[-1].message == (  # type: ignore[union-attr]
            "limit: too many unauthenticated connections from this address (limit 2): the oldest is closed"
        )
        c3.auth("alice", "alice-secret")
        c3.subscribe("chan1")
        c3.publish("chan1", b"fine")
        assert c3.messages(1)[0].payload == b"fine"


def test_subscription_cap(start_broker, tmp_path) -> None:
    users = {"many": {"secret": "s", "subchans": [f"c{i}" for i in range(10)], "pubchans": []}}
    b = start_broker("--max-subscriptions", "3", users=users)
    with RawClient(b.port) as c:
        c.auth("many", "s")
        c.subscribe("c0", "c1", "c2", "c3")
        assert c.expect_error().startswith("limit: subscription to 'c3' refused")
