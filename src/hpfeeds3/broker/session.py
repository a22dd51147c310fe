"""Session: the broker side of one client, sans I/O.

Bytes and events in, actions out. The session owns the connection's state
machine and every decision about the client's frames; it has no sockets, no
event loop and no clock, so it is tested with plain bytes (``tests/broker``).
The ``asyncio.Protocol`` around it (``connection.Connection``) feeds it reads,
timer expiries and key-store answers, and carries out its ``Actions``.

States::

    PRE_AUTH ──AUTH──> AUTHING ──key verified──> READY
        │                 │                        │
        └─────────────────┴────────────────────────┴──> CLOSED (with a CloseReason)

- PRE_AUTH accepts one frame, AUTH; any other opcode is refused on its header.
  Frames behind the AUTH stay buffered until the key is verified, then are
  handled in order.
- READY: PUBLISH runs are checked once per run (the ident of the connection,
  a channel of its ``pubchans``) and handed on whole; SUBSCRIBE/UNSUBSCRIBE
  check the ident and the channel. A refused frame gets an ERROR and changes
  nothing, up to ``max_denials``; a second AUTH closes.
- Nothing is sent on success (not after AUTH, not after SUBSCRIBE).
- The work of one ``receive``/``resume`` call is bounded (``budget``); what is
  left stays in the decoder, and the call returns True so the caller pauses
  reading and resumes in a later loop turn.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..protocol import (
    CLIENT_TO_BROKER,
    OP_AUTH,
    Auth,
    Decoder,
    FrameLimits,
    ProtocolError,
    Publish,
    PublishRun,
    Subscribe,
    UnexpectedOpcode,
    Unsubscribe,
    encode_error,
    verify,
)
from . import metrics
from .auth import AccessKey
from .metrics import PublishStats
from .reasons import ERROR_TOKEN, CloseReason
from .text import printable, quoted

log = logging.getLogger("hpfeeds3.broker.connection")

PRE_AUTH, AUTHING, READY, CLOSED = range(4)

_AUTH_ONLY = frozenset({OP_AUTH})

# A secret no key can have: verifying against it makes an unknown ident cost
# exactly what a wrong secret costs.
_DUMMY_SECRET = b"\x00unknown-ident\x00" * 2

# One unit of the per-turn budget per checked item (a control frame, a run)
# plus one per this many deliveries of a run (a run to a channel with 3,000
# subscribers is 3,000 writes).
DELIVERIES_PER_WORK_UNIT = 16


class Actions(Protocol):
    """What a session asks of the I/O around it."""

    def send(self, data: bytes) -> None:
        """Write ``data`` to the client."""

    def close_transport(self, reason: CloseReason, error: bytes | None, abort: bool) -> None:
        """The session is closed: flush ``error`` (an ERROR frame) if given, then close (or abort)."""

    def publish(self, channel: bytes, data: bytes, frames: int) -> int:
        """Fan ``frames`` whole PUBLISH frames out to ``channel``; returns the deliveries made."""

    def subscribe(self, channel: bytes) -> None: ...

    def unsubscribe(self, channel: bytes) -> None: ...

    def lookup(self, ident: str) -> None:
        """Find the key of ``ident``; answer with ``key_found``/``key_unavailable``/``refuse``, now or later."""

    def authenticated(self, key: AccessKey) -> None:
        """The session became READY with ``key`` (set its channels with ``set_channels``)."""

    def auth_failed(self, ident: str | None, shown: str, why: str) -> None:
        """A verified AUTH failed (``why``: unknown_ident or wrong_secret); ``ident`` is
        the text ident when valid UTF-8 (feeds the failed-AUTH limiter), ``shown`` it escaped."""

    def auth_unavailable(self, shown: str, why: str) -> None:
        """The key store could not answer for ``shown`` (the ident, escaped)."""

    def left_pre_auth(self) -> None:
        """The session left PRE_AUTH/AUTHING (ready or closed): exactly once."""


class Session:
    __slots__ = (
        "_budget",
        "_decoder",
        "_denials",
        "_digest",
        "_ident_text",
        "_max_denials",
        "_max_subscriptions",
        "actions",
        "close_reason",
        "ident",
        "ident_bytes",
        "nonce",
        "owner",
        "peer",
        "pubchans",
        "publish_stats",
        "secret_seen",
        "state",
        "subchans",
        "subscriptions",
    )

    def __init__(
        self,
        actions: Actions,
        nonce: bytes,
        frame_limits: FrameLimits,
        *,
        max_subscriptions: int,
        max_denials: int,
        budget: int,
        peer: str = "?",
    ) -> None:
        self.actions = actions
        self.nonce = nonce
        self.peer = peer
        self.state = PRE_AUTH
        self.close_reason: CloseReason | None = None
        self.ident: str | None = None
        self.ident_bytes = b""
        self.owner = ""
        self.secret_seen = ""  # to notice a rotated secret (revocation)
        self.pubchans: frozenset[bytes] = frozenset()
        self.subchans: frozenset[bytes] = frozenset()
        self.subscriptions: set[bytes] = set()
        self.publish_stats: dict[bytes, PublishStats] = {}
        self._decoder = Decoder(_AUTH_ONLY, frame_limits, runs=True)
        self._digest = b""
        self._ident_text: str | None = None  # the AUTH's ident when it is valid UTF-8
        self._denials = 0
        self._max_subscriptions = max_subscriptions
        self._max_denials = max_denials
        self._budget = budget

    # --- input ------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not handled yet."""
        return self._decoder.buffered

    @property
    def pending_frame_bytes(self) -> int:
        """Declared length of the frame whose header has arrived and body has not (else 0)."""
        return self._decoder.pending_frame_bytes

    def receive(self, data: bytes) -> bool:
        """Handle a read; True when work is left for a later turn (pause reading, then ``resume``)."""
        self._decoder.receive(data)
        if self.state == AUTHING:
            return False  # frames behind AUTH wait for the key
        return self.resume()

    def resume(self) -> bool:
        """Handle buffered frames up to the budget; True when some are left."""
        decoder = self._decoder
        work = 0
        budget = self._budget
        try:
            while self.state == READY:
                if work >= budget:
                    return decoder.buffered > 0
                item = decoder.next_item()
                if item is None:
                    return False
                work += 1
                if type(item) is PublishRun:
                    work += self._publish_run(item) // DELIVERIES_PER_WORK_UNIT
                else:
                    self._control(item)  # type: ignore[arg-type]
            if self.state == PRE_AUTH:
                item = decoder.next_item()
                if item is not None:
                    assert isinstance(item, Auth)  # the decoder accepts nothing else here
                    self._start_auth(item)
        except UnexpectedOpcode as e:
            if self.state == PRE_AUTH:
                self._refuse(CloseReason.NOT_AUTHENTICATED, "first message was not AUTH", "invalid-first-message")
            else:
                self._protocol_error(e)
        except ProtocolError as e:
            self._protocol_error(e)
        return False

    # --- READY: the hot path ---------------------------------------------------------

    def _publish_run(self, run: PublishRun) -> int:
        channel = run.channel
        if run.ident != self.ident_bytes or channel not in self.pubchans:
            # Each refused frame is one denial, as if they came one by one.
            for _ in range(run.frames):
                self._deny_publish(run.ident, channel)
                if self.state != READY:
                    break
            return 0
        stats = self.publish_stats.get(channel)
        if stats is None:
            stats = self.publish_stats[channel] = PublishStats()
        frames = run.frames
        stats.count += frames
        lens = run.payload_lens
        if lens is None:
            stats.bytes += frames * run.payload_len
            stats.bits[(run.payload_len - 1).bit_length()] += frames
        else:
            stats.bytes += sum(lens)
            bits = stats.bits
            for n in lens:
                bits[(n - 1).bit_length()] += 1
        return self.actions.publish(channel, run.data, frames)

    def _deny_publish(self, ident: bytes, channel: bytes) -> None:
        if ident != self.ident_bytes:
            self._deny_spoof("publish", ident, "ident-mismatch-pub")
        else:
            metrics.CONNECTION_ERROR.labels(self.ident or "", "no-pub-permission").inc()
            self._deny(f"accessfail: {printable(self.ident_bytes)} may not publish to channel {quoted(channel)}")

    def _deny_spoof(self, verb: str, ident: bytes, category: str) -> None:
        metrics.CONNECTION_ERROR.labels(self.ident or "", category).inc()
        self._deny(f"identfail: {verb} as {quoted(ident)} refused; this connection is {quoted(self.ident_bytes)}")

    def _control(self, frame: Auth | Publish | Subscribe | Unsubscribe) -> None:
        if isinstance(frame, Subscribe):
            channel = frame.channel
            if frame.ident != self.ident_bytes:
                self._deny_spoof("subscribe", frame.ident, "ident-mismatch-sub")
            elif channel not in self.subchans:
                metrics.CONNECTION_ERROR.labels(self.ident or "", "no-sub-permission").inc()
                self._deny(f"accessfail: {printable(self.ident_bytes)} may not subscribe to channel {quoted(channel)}")
            elif channel not in self.subscriptions:
                if len(self.subscriptions) >= self._max_subscriptions:
                    metrics.LIMIT_REJECTIONS.labels("max_subscriptions").inc()
                    self._deny(
                        f"limit: subscription to {quoted(channel)} refused; at most "
                        f"{self._max_subscriptions} channels per connection"
                    )
                    return
                self.subscriptions.add(channel)
                self.actions.subscribe(channel)
        elif isinstance(frame, Unsubscribe):
            if frame.ident != self.ident_bytes:
                self._deny_spoof("unsubscribe", frame.ident, "ident-mismatch-unsub")
            elif frame.channel in self.subscriptions:
                self.subscriptions.discard(frame.channel)
                self.actions.unsubscribe(frame.channel)
        elif isinstance(frame, Auth):
            self._refuse(CloseReason.SECOND_AUTH, "already authenticated; a second AUTH is refused", "second-auth")
        else:  # pragma: no cover - the decoder yields runs for PUBLISH and refuses every other opcode
            raise AssertionError(frame)

    # --- AUTH -----------------------------------------------------------------------

    def _start_auth(self, frame: Auth) -> None:
        self.state = AUTHING
        self.ident_bytes = frame.ident
        self._digest = frame.digest
        try:
            self._ident_text = frame.ident.decode("utf-8")
        except UnicodeDecodeError:
            self.key_found(None)  # can never match a key; costs what a wrong secret costs
            return
        self.actions.lookup(self._ident_text)

    def key_found(self, key: AccessKey | None) -> bool:
        """The key store's answer for the ident of the AUTH; True when work is left (see ``receive``)."""
        if self.state != AUTHING:
            return False  # closed (timeout, shutdown) while the store looked
        secret = key.secret.encode("utf-8") if key is not None else _DUMMY_SECRET
        if key is None or not verify(self.nonce, secret, self._digest):
            shown = printable(self.ident_bytes)
            # One metric reason for both: /metrics must not tell which idents exist.
            metrics.AUTH_FAILURES.labels("auth_failed").inc()
            self.actions.auth_failed(self._ident_text, shown, "unknown_ident" if key is None else "wrong_secret")
            self._refuse(CloseReason.AUTH_FAILED, f"Authentication failed for {shown}", "invalid-secret")
            return False
        self.ident = key.ident
        self.owner = key.owner or ""
        self.secret_seen = key.secret
        self.state = READY
        self._decoder.accept(CLIENT_TO_BROKER)
        self.actions.left_pre_auth()
        self.actions.authenticated(key)
        return self.resume()

    def key_unavailable(self, why: str) -> None:
        """The key store could not answer."""
        if self.state != AUTHING:
            return
        ident = printable(self.ident_bytes)
        self.actions.auth_unavailable(ident, why)
        metrics.AUTH_FAILURES.labels("store_unavailable").inc()
        self._refuse(
            CloseReason.AUTH_UNAVAILABLE,
            f"Authentication failed for {ident}: the key store is unavailable, try again later",
            "auth-unavailable",
        )

    def rate_limited(self, block_s: float) -> None:
        """Refused without a lookup or a verification: this address (or address and ident) is
        blocked for ``block_s`` more seconds."""
        metrics.AUTH_FAILURES.labels("rate_limited").inc()
        metrics.LIMIT_REJECTIONS.labels("auth_failures").inc()
        self._refuse(
            CloseReason.AUTH_RATE_LIMITED,
            f"Authentication failed for {printable(self.ident_bytes)}: too many failed attempts, "
            f"try again in {block_s:g} s",
            "auth-rate-limited",
        )

    def auth_timeout(self, timeout_s: float) -> None:
        if self.state in (PRE_AUTH, AUTHING):
            metrics.AUTH_FAILURES.labels("timeout").inc()
            self._refuse(CloseReason.AUTH_TIMEOUT, f"no valid AUTH within {timeout_s:g} s", "auth-timeout")

    # --- changes from the key store (revocation) ---------------------------------------

    def set_channels(self, pubchans: frozenset[bytes], subchans: frozenset[bytes]) -> set[bytes]:
        """New permissions; returns the subscriptions they take away (already unsubscribed)."""
        self.pubchans = pubchans
        self.subchans = subchans
        lost = self.subscriptions - subchans
        for channel in lost:
            self.subscriptions.discard(channel)
            self.actions.unsubscribe(channel)
        return lost

    # --- refusing and closing ---------------------------------------------------------------

    def _deny(self, message: str) -> None:
        """A refused frame: ERROR, no effect, connection stays open up to the denial cap."""
        self._denials += 1
        if self._denials > self._max_denials:
            metrics.LIMIT_REJECTIONS.labels("max_denials").inc()
            self.close(CloseReason.TOO_MANY_DENIALS, f"more than {self._max_denials} refused frames on this connection")
            return
        log.debug("%s (%s): %s", self.peer, self.ident, message)
        self.actions.send(encode_error(message))

    def _protocol_error(self, e: ProtocolError) -> None:
        reason = CloseReason.FRAME_TOO_LARGE if e.reason == "frame_too_large" else CloseReason.BAD_FRAME
        if reason is CloseReason.FRAME_TOO_LARGE:
            metrics.LIMIT_REJECTIONS.labels("max_message_size").inc()
        metrics.CONNECTION_ERROR.labels(self.ident or "", reason.value).inc()
        self.close(reason, str(e))

    def _refuse(self, reason: CloseReason, message: str, category: str) -> None:
        metrics.CONNECTION_ERROR.labels(self.ident or "", category).inc()
        self.close(reason, message)

    def close(self, reason: CloseReason, message: str | None, *, abort: bool = False) -> None:
        """Close with a recorded reason; ``message`` goes out in an ERROR frame first. Idempotent."""
        if self.state == CLOSED:
            return
        was = self.state
        self.state = CLOSED
        self.close_reason = reason
        self._decoder = Decoder(_AUTH_ONLY, runs=True)  # drop what was buffered
        if was != READY:
            self.actions.left_pre_auth()
        for channel in self.subscriptions:
            self.actions.unsubscribe(channel)
        self.subscriptions = set()
        error = None
        if message is not None and not abort:
            token = ERROR_TOKEN.get(reason, "error")
            error = encode_error(message if message.startswith(f"{token}:") else f"{token}: {message}")
        self.actions.close_transport(reason, error, abort)
