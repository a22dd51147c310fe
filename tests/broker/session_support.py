"""A Session driven with plain bytes: its actions recorded, keys from a dict.

``Recorder`` implements ``session.Output`` and ``session.Port``; ``normalized`` merges the
publishes that a run boundary may split (consecutive publishes to one
channel), so outputs can be compared however the input was cut into reads.
"""

from __future__ import annotations

from typing import Any

from hpfeeds3.broker.auth import AccessKey
from hpfeeds3.broker.reasons import CloseReason
from hpfeeds3.broker.session import NeedKey, Refusal, Session
from hpfeeds3.protocol import DEFAULT_LIMITS, FrameLimits, encode_auth, sign

NONCE = b"\x01\x02\x03\x04"
KEYS = {
    "alice": AccessKey("alice", "s3cret", "owner", ("chan1", "chan2"), ("chan1", "chan2")),
}


class Recorder:
    """The session's ``Output`` and ``Port``, as a list of tuples; it also plays the
    connection's part at an AUTH: a ``NeedKey`` is answered from ``keys``, at once
    or later (``answer_now``), and a verified key is followed by ``resume``."""

    def __init__(self, keys: dict[str, AccessKey] | None = None, *, answer_now: bool = True) -> None:
        self.keys = KEYS if keys is None else keys
        self.answer_now = answer_now
        self.log: list[tuple[Any, ...]] = []
        self.refusals: list[Refusal] = []
        self.session: Session[Recorder] | None = None
        self.pre_auth_left = 0
        self.pending_lookup: str | None = None

    # --- Output ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.log.append(("send", data))

    def close_transport(self, reason: CloseReason, error: bytes | None, abort: bool) -> None:
        self.log.append(("close", reason, error, abort))

    # --- Port ------------------------------------------------------------------------

    def publish(self, channel: bytes, data: bytes, frames: int) -> int:
        self.log.append(("publish", channel, data, frames))
        return 1

    def subscribe(self, channel: bytes, output: Recorder) -> None:
        self.log.append(("subscribe", channel))

    def unsubscribe(self, channel: bytes, output: Recorder) -> None:
        self.log.append(("unsubscribe", channel))

    def channel_set(self, channels: tuple[str, ...]) -> frozenset[bytes]:
        return frozenset(c.encode() for c in channels)

    def left_pre_auth(self, output: Recorder) -> None:
        self.pre_auth_left += 1

    def auth_failed(self, output: Recorder, ident: str | None, shown: str, why: str) -> None:
        if ident is not None:  # what feeds the failed-AUTH limiter
            self.log.append(("auth_failed", ident))

    def refused(self, refusal: Refusal, ident: str | None) -> None:
        self.refusals.append(refusal)

    # --- the connection's part ---------------------------------------------------------

    def answer(self, need: NeedKey) -> bool | NeedKey:
        self.log.append(("lookup", need.ident))
        if not self.answer_now:
            self.pending_lookup = need.ident
            return False
        return self.key_found(self.keys.get(need.ident))

    def key_found(self, key: AccessKey | None) -> bool | NeedKey:
        assert self.session is not None
        if not self.session.key_found(key):
            return False
        assert key is not None
        self.log.append(("authenticated", key.ident))
        return self.session.resume()


def make_session(
    *,
    keys: dict[str, AccessKey] | None = None,
    answer_now: bool = True,
    max_subscriptions: int = 1024,
    max_denials: int = 100,
    budget: int = 1024,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> tuple[Session[Recorder], Recorder]:
    recorder = Recorder(keys, answer_now=answer_now)
    session = Session(
        recorder,
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


def drain(session: Session[Recorder], data: bytes) -> None:
    """Feed ``data`` and finish every turn it needs, as the connection does."""
    recorder = session.output
    assert isinstance(recorder, Recorder)
    work = session.receive(data)
    while work is not False:
        work = session.resume() if work is True else recorder.answer(work)


def normalized(log: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The actions with consecutive publishes to one channel merged (data joined, frames summed)."""
    out: list[tuple[Any, ...]] = []
    for entry in log:
        if entry[0] == "publish" and out and out[-1][0] == "publish" and out[-1][1] == entry[1]:
            out[-1] = ("publish", entry[1], out[-1][2] + entry[2], out[-1][3] + entry[3])
        else:
            out.append(entry)
    return out
