"""A Session driven with plain bytes: its actions recorded, keys from a dict.

``Recorder`` implements ``session.Actions``; ``normalized`` merges the
publishes that a run boundary may split (consecutive publishes to one
channel), so outputs can be compared however the input was cut into reads.
"""

from __future__ import annotations

from typing import Any

from hpfeeds3.broker.auth import AccessKey
from hpfeeds3.broker.reasons import CloseReason
from hpfeeds3.broker.session import Session
from hpfeeds3.protocol import DEFAULT_LIMITS, FrameLimits, encode_auth, sign

NONCE = b"\x01\x02\x03\x04"
KEYS = {
    "alice": AccessKey("alice", "s3cret", "owner", ("chan1", "chan2"), ("chan1", "chan2")),
}


class Recorder:
    """The session's actions, as a list of tuples; lookups answered from ``keys`` at once or later."""

    def __init__(self, keys: dict[str, AccessKey] | None = None, *, answer_now: bool = True) -> None:
        self.keys = KEYS if keys is None else keys
        self.answer_now = answer_now
        self.log: list[tuple[Any, ...]] = []
        self.session: Session | None = None
        self.pre_auth_left = 0
        self.pending_lookup: str | None = None

    def send(self, data: bytes) -> None:
        self.log.append(("send", data))

    def close_transport(self, reason: CloseReason, error: bytes | None, abort: bool) -> None:
        self.log.append(("close", reason, error, abort))

    def publish(self, channel: bytes, data: bytes, frames: int) -> int:
        self.log.append(("publish", channel, data, frames))
        return 1

    def subscribe(self, channel: bytes) -> None:
        self.log.append(("subscribe", channel))

    def unsubscribe(self, channel: bytes) -> None:
        self.log.append(("unsubscribe", channel))

    def lookup(self, ident: str) -> None:
        self.log.append(("lookup", ident))
        if self.answer_now:
            assert self.session is not None
            self.session.key_found(self.keys.get(ident))
        else:
            self.pending_lookup = ident

    def authenticated(self, key: AccessKey) -> None:
        assert self.session is not None
        self.session.set_channels(
            frozenset(c.encode() for c in key.pubchans), frozenset(c.encode() for c in key.subchans)
        )
        self.log.append(("authenticated", key.ident))

    def auth_failed(self, ident: str | None, shown: str, why: str) -> None:
        if ident is not None:  # what feeds the failed-AUTH limiter
            self.log.append(("auth_failed", ident))

    def auth_unavailable(self, shown: str, why: str) -> None:
        self.log.append(("auth_unavailable", shown))

    def left_pre_auth(self) -> None:
        self.pre_auth_left += 1


def make_session(
    *,
    keys: dict[str, AccessKey] | None = None,
    answer_now: bool = True,
    max_subscriptions: int = 1024,
    max_denials: int = 100,
    budget: int = 1024,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> tuple[Session, Recorder]:
    recorder = Recorder(keys, answer_now=answer_now)
    session = Session(
        recorder,
        NONCE,
        limits,
        max_subscriptions=max_subscriptions,
        max_denials=max_denials,
        budget=budget,
        peer="127.0.0.1:4242",
    )
    recorder.session = session
    return session, recorder


def auth_frame(ident: bytes = b"alice", secret: bytes = b"s3cret") -> bytes:
    return encode_auth(ident, sign(NONCE, secret))


def drain(session: Session, data: bytes) -> None:
    """Feed ``data`` and finish every turn it needs, as the connection does."""
    more = session.receive(data)
    while more:
        more = session.resume()


def normalized(log: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The actions with consecutive publishes to one channel merged (data joined, frames summed)."""
    out: list[tuple[Any, ...]] = []
    for entry in log:
        if entry[0] == "publish" and out and out[-1][0] == "publish" and out[-1][1] == entry[1]:
            out[-1] = ("publish", entry[1], out[-1][2] + entry[2], out[-1][3] + entry[3])
        else:
            out.append(entry)
    return out
