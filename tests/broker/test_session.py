"""The broker's Session with plain bytes: no sockets, no loop, no clock."""

from __future__ import annotations

import json
import subprocess
import sys

from hpfeeds3.broker.auth import AccessKey
from hpfeeds3.broker.reasons import CloseReason
from hpfeeds3.broker.session import AUTHING, CLOSED, PRE_AUTH, READY, Refusal
from hpfeeds3.protocol import (
    HEADER,
    OP_PUBLISH,
    FrameLimits,
    encode_error,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
)

from .session_support import auth_frame, drain, make_session


def closes(log) -> list[tuple]:
    return [e for e in log if e[0] == "close"]


def test_first_frame_not_auth_is_refused_on_its_header() -> None:
    session, rec = make_session()
    # Only the header of a 1 MiB PUBLISH: refused before any body byte arrives.
    drain(session, HEADER.pack(5 + 1024 * 1024, OP_PUBLISH))
    assert session.state == CLOSED
    assert closes(rec.log) == [
        ("close", CloseReason.NOT_AUTHENTICATED, encode_error("authfail: first message was not AUTH"), False)
    ]
    assert rec.pre_auth_left == 1


def test_valid_auth_becomes_ready_and_sends_nothing() -> None:
    session, rec = make_session()
    drain(session, auth_frame())
    assert session.state == READY
    assert session.ident == "alice"
    assert rec.log == [("lookup", "alice"), ("authenticated", "alice")]
    assert rec.pre_auth_left == 1


def test_wrong_secret_and_unknown_ident_get_the_same_error() -> None:
    texts = []
    for ident, secret in ((b"alice", b"wrong"), (b"zelda", b"s3cret")):
        session, rec = make_session()
        drain(session, auth_frame(ident, secret))
        assert session.close_reason is CloseReason.AUTH_FAILED
        assert ("auth_failed", ident.decode()) in rec.log
        texts.append(closes(rec.log)[0][2].replace(ident, b"IDENT"))
        assert rec.pre_auth_left == 1
    assert texts[0] == texts[1] == encode_error("authfail: Authentication failed for IDENT")


def test_invalid_utf8_ident_fails_without_a_lookup() -> None:
    session, rec = make_session()
    drain(session, auth_frame(b"\xff\xfe"))
    assert session.close_reason is CloseReason.AUTH_FAILED
    assert not [e for e in rec.log if e[0] in ("lookup", "auth_failed")]


def test_frames_behind_auth_wait_for_a_slow_lookup_then_run_in_order() -> None:
    session, rec = make_session(answer_now=False)
    pub = encode_publish(b"alice", b"chan1", b"one")
    drain(session, auth_frame() + encode_subscribe(b"alice", b"chan2") + pub)
    assert session.state == AUTHING
    assert rec.log == [("lookup", "alice")]
    assert session.buffered == len(encode_subscribe(b"alice", b"chan2") + pub)
    # The answer does not re-enter the caller: key_found makes the session READY and
    # returns; the frames behind the AUTH run at the caller's resume.
    assert session.key_found(rec.keys["alice"]) is True
    assert session.state == READY and rec.log == [("lookup", "alice")]
    assert session.resume() is False
    assert rec.log[1:] == [("subscribe", b"chan2"), ("publish", b"chan1", pub, 1)]


def test_an_answer_after_close_is_ignored() -> None:
    session, rec = make_session(answer_now=False)
    drain(session, auth_frame())
    session.auth_timeout(5.0)
    assert session.close_reason is CloseReason.AUTH_TIMEOUT
    assert session.key_found(rec.keys["alice"]) is False
    assert session.state == CLOSED and "authenticated" not in [e[0] for e in rec.log]
    assert rec.pre_auth_left == 1


def test_a_run_of_publishes_is_one_action_with_the_bytes_unchanged() -> None:
    session, rec = make_session()
    frames = [encode_publish(b"alice", b"chan1", b"x" * n) for n in (0, 5, 5, 300)]
    drain(session, auth_frame())
    drain(session, b"".join(frames))
    assert rec.log[-1] == ("publish", b"chan1", b"".join(frames), 4)
    stats = session.publish_stats[b"chan1"]
    assert (stats.count, stats.bytes) == (4, 310)


def test_spoofed_ident_and_denied_channel_get_one_error_per_frame_and_change_nothing() -> None:
    session, rec = make_session()
    drain(session, auth_frame())
    rec.log.clear()
    spoof = encode_publish(b"mallory", b"chan1", b"x")
    denied = encode_publish(b"alice", b"secret", b"x")
    drain(session, spoof * 2 + denied * 3)
    sends = [e[1] for e in rec.log if e[0] == "send"]
    assert len(sends) == 5
    assert sends[0] == encode_error("identfail: publish as 'mallory' refused; this connection is 'alice'")
    assert sends[2] == encode_error("accessfail: alice may not publish to channel 'secret'")
    assert not [e for e in rec.log if e[0] == "publish"]
    assert session.state == READY


def test_the_denial_cap_closes() -> None:
    session, rec = make_session(max_denials=3)
    drain(session, auth_frame())
    drain(session, encode_publish(b"alice", b"secret", b"x") * 10)
    assert session.close_reason is CloseReason.TOO_MANY_DENIALS
    assert len([e for e in rec.log if e[0] == "send"]) == 3


def test_subscribe_checks_ident_channel_and_limit_and_is_idempotent() -> None:
    session, rec = make_session(max_subscriptions=1)
    drain(session, auth_frame())
    rec.log.clear()
    drain(
        session,
        encode_subscribe(b"mallory", b"chan1")
        + encode_subscribe(b"alice", b"nope")
        + encode_subscribe(b"alice", b"chan1")
        + encode_subscribe(b"alice", b"chan1")
        + encode_subscribe(b"alice", b"chan2"),
    )
    assert [e[0] for e in rec.log] == ["send", "send", "subscribe", "send"]
    assert rec.log[3][1] == encode_error("limit: subscription to 'chan2' refused; at most 1 channels per connection")
    assert session.subscriptions == {b"chan1"}


def test_unsubscribe_checks_the_ident() -> None:
    session, rec = make_session()
    drain(session, auth_frame() + encode_subscribe(b"alice", b"chan1"))
    rec.log.clear()
    drain(session, encode_unsubscribe(b"mallory", b"chan1"))
    assert rec.log == [
        ("send", encode_error("identfail: unsubscribe as 'mallory' refused; this connection is 'alice'"))
    ]
    assert session.subscriptions == {b"chan1"}
    drain(session, encode_unsubscribe(b"alice", b"chan1") + encode_unsubscribe(b"alice", b"never"))
    assert rec.log[-1] == ("unsubscribe", b"chan1")
    assert session.subscriptions == set()


def test_second_auth_closes() -> None:
    session, _ = make_session()
    drain(session, auth_frame() + auth_frame())
    assert session.close_reason is CloseReason.SECOND_AUTH


def test_malformed_and_oversized_frames_close_with_their_reason() -> None:
    session, _ = make_session()
    drain(session, auth_frame() + HEADER.pack(5, OP_PUBLISH))
    assert session.close_reason is CloseReason.BAD_FRAME
    session, _ = make_session(limits=FrameLimits(max_publish_frame_bytes=100))
    drain(session, auth_frame() + HEADER.pack(101, OP_PUBLISH))
    assert session.close_reason is CloseReason.FRAME_TOO_LARGE


def test_work_past_the_budget_waits_for_resume_in_order() -> None:
    session, rec = make_session(budget=3)
    drain(session, auth_frame())
    rec.log.clear()
    frames = [encode_publish(b"alice", (b"chan1", b"chan2")[i % 2], b"%d" % i) for i in range(10)]
    assert session.receive(b"".join(frames)) is True
    assert len(rec.log) == 3
    while session.resume():
        pass
    assert [e[2] for e in rec.log] == frames


def test_close_drops_every_subscription_and_gives_back_pre_auth_once() -> None:
    session, rec = make_session()
    drain(session, auth_frame() + encode_subscribe(b"alice", b"chan1") + encode_subscribe(b"alice", b"chan2"))
    session.close(CloseReason.SHUTDOWN, None)
    session.close(CloseReason.SHUTDOWN, None)
    assert sorted(e[1] for e in rec.log if e[0] == "unsubscribe") == [b"chan1", b"chan2"]
    assert len(closes(rec.log)) == 1
    assert rec.pre_auth_left == 1


def test_close_before_auth_gives_back_pre_auth_once() -> None:
    session, rec = make_session()
    assert session.state == PRE_AUTH
    session.close(CloseReason.CLIENT_CLOSED, None)
    session.auth_timeout(5.0)
    assert rec.pre_auth_left == 1


def test_revoked_channel_unsubscribes() -> None:
    session, rec = make_session()
    drain(session, auth_frame() + encode_subscribe(b"alice", b"chan1") + encode_subscribe(b"alice", b"chan2"))
    lost = session.apply_key(AccessKey("alice", "s3cret", "owner", ("chan1",), ("chan1",)))
    assert lost == {b"chan2"}
    assert session.subscriptions == {b"chan1"}
    assert rec.log[-1] == ("unsubscribe", b"chan2")


def test_store_unavailable_and_rate_limited_close_with_clear_errors() -> None:
    session, rec = make_session(answer_now=False)
    drain(session, auth_frame())
    session.key_unavailable("timed out")
    assert closes(rec.log)[0][2] == encode_error(
        "authfail: Authentication failed for alice: the key store is unavailable, try again later"
    )
    session, rec = make_session(answer_now=False)
    drain(session, auth_frame())
    session.rate_limited(300)
    assert closes(rec.log)[0][2] == encode_error(
        "authfail: Authentication failed for alice: too many failed attempts, try again in 300 s"
    )


def test_error_texts_escape_control_and_line_breaking_characters() -> None:
    session, rec = make_session()
    drain(session, auth_frame())
    drain(session, encode_publish(b"alice", "a\x00b\u2028c\x85d".encode(), b"x"))
    text = rec.log[-1][1][5:].decode()
    assert text == "accessfail: alice may not publish to channel 'a\\x00b\\u2028c\\x85d'"


def test_refusals_are_reported_as_values() -> None:
    session, rec = make_session(max_denials=2)
    drain(session, auth_frame() + encode_publish(b"mallory", b"chan1", b"x") + encode_subscribe(b"alice", b"nope"))
    drain(session, encode_publish(b"alice", b"nope", b"x"))
    assert rec.refusals == [
        Refusal.IDENT_MISMATCH_PUB,
        Refusal.NO_SUB_PERMISSION,
        Refusal.NO_PUB_PERMISSION,
        Refusal.TOO_MANY_DENIALS,
    ]
    assert session.close_reason is CloseReason.TOO_MANY_DENIALS


def test_importing_the_session_loads_the_protocol_and_the_standard_library_only() -> None:
    """No metrics, key stores, TLS or event loop behind the session: the modules of
    this project it loads are protocol/ and two leaf modules of plain text."""
    code = (
        "import json, sys, hpfeeds3.broker.session; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('hpfeeds3', 'prometheus_client', 'sqlite3', 'ssl', 'asyncio', 'aiohttp', 'nats'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    allowed = {"hpfeeds3", "hpfeeds3.broker", "hpfeeds3.broker.session", "hpfeeds3.broker.reasons"}
    allowed.add("hpfeeds3.broker.text")
    loaded = json.loads(out)
    assert "hpfeeds3.broker.session" in loaded
    assert [m for m in loaded if m not in allowed and not m.startswith("hpfeeds3.protocol")] == []
