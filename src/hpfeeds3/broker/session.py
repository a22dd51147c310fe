"""Session: the broker side of one client, sans I/O.

Bytes and events in, actions out. The session owns the connection's state
machine and every decision about the client's frames; it has no sockets, no
event loop and no clock, so it is tested with plain bytes (``tests/broker``).
Importing it loads ``protocol/`` and the standard library only (a test
checks): no metrics, no key stores, no TLS.

Its seam is narrow:

- an ``Output`` (``send``, ``close_transport``): the connection's transport;
- a ``Port`` to the broker (publish, subscribe, unsubscribe, channel
  interning, leaving the pre-auth pool, a failed AUTH, a refusal counted):
  ``state.Broker`` implements it;
- values returned, not callbacks: ``receive``/``resume`` return ``NeedKey``
  when an AUTH needs its key (the caller looks it up and answers with
  ``key_found``, which never re-enters the caller), and every refused frame
  or connection is reported as a ``Refusal`` the broker counts.

The ``asyncio.Protocol`` around it (``connection.Connection``) feeds it reads,
timer expiries and key-store answers.

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
import operator
from enum import Enum
from typing import Generic, NamedTuple, Protocol, TypeVar

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
from .reasons import ERROR_TOKEN, CloseReason
from .text import printable, quoted

_new = tuple.__new__

log = logging.getLogger("hpfeeds3.broker.connection")

PRE_AUTH, AUTHING, READY, CLOSED = range(4)

_AUTH_ONLY = frozenset({OP_AUTH})

# A secret no key can have: verifying against it makes an unknown ident cost
# exactly what a wrong secret costs.
# The subscriptions of a session that has none (shared; replaced by a set at the first).
_NO_SUBSCRIPTIONS: frozenset[bytes] = frozenset()
_DUMMY_SECRET = b"\x00unknown-ident\x00" * 2

# One unit of the per-turn budget per checked item (a control frame, a run)
# plus one per this many deliveries of a run (a run to a channel with 3,000
# subscribers is 3,000 writes).
DELIVERIES_PER_WORK_UNIT = 16


class Refusal(Enum):
    """A refused frame or connection, as the session reports it (``Port.refused``);
    ``metrics.REFUSALS`` says what each one counts."""

    NO_PUB_PERMISSION = "no-pub-permission"
    NO_SUB_PERMISSION = "no-sub-permission"
    IDENT_MISMATCH_PUB = "ident-mismatch-pub"
    IDENT_MISMATCH_SUB = "ident-mismatch-sub"
    IDENT_MISMATCH_UNSUB = "ident-mismatch-unsub"
    MAX_SUBSCRIPTIONS = "max-subscriptions"
    TOO_MANY_DENIALS = "too-many-denials"
    FIRST_NOT_AUTH = "invalid-first-message"
    SECOND_AUTH = "second-auth"
    AUTH_FAILED = "invalid-secret"
    AUTH_UNAVAILABLE = "auth-unavailable"
    AUTH_RATE_LIMITED = "auth-rate-limited"
    AUTH_TIMEOUT = "auth-timeout"
    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"


class NeedKey(NamedTuple):
    """An AUTH arrived: look up the key of ``ident``, then call ``key_found`` (or
    ``key_unavailable``/``rate_limited``), now or later."""

    ident: str


class Key(Protocol):
    """What the session reads of an access key (``auth.AccessKey``)."""

    @property
    def ident(self) -> str: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def secret(self) -> str: ...
    @property
    def pubchans(self) -> tuple[str, ...]: ...
    @property
    def subchans(self) -> tuple[str, ...]: ...


class Output(Protocol):
    """The session's way out to its client: the connection's transport."""

    def send(self, data: bytes) -> None:
        """Write ``data`` to the client."""

    def close_transport(self, reason: CloseReason, error: bytes | None, abort: bool) -> None:
        """The session is closed: flush ``error`` (an ERROR frame) if given, then close (or abort)."""


_O = TypeVar("_O", bound=Output)
_O_in = TypeVar("_O_in", bound=Output, contravariant=True)


class Port(Protocol[_O_in]):
    """The session's way into the broker (``state.Broker``); ``output`` names the connection."""

    def publish(self, channel: bytes, data: bytes, frames: int) -> int:
        """Fan ``frames`` whole PUBLISH frames out to ``channel``; returns the deliveries made."""

    def subscribe(self, channel: bytes, output: _O_in) -> None: ...

    def unsubscribe(self, channel: bytes, output: _O_in) -> None: ...

    def channel_set(self, channels: tuple[str, ...]) -> frozenset[bytes]:
        """A key's channels as the bytes the hot path compares (one shared set per distinct list)."""

    def left_pre_auth(self, output: _O_in) -> None:
        """The session left PRE_AUTH/AUTHING (ready or closed): exactly once."""

    def auth_failed(self, output: _O_in, ident: str | None, shown: str, why: str) -> None:
        """A verified AUTH failed (``why``: unknown_ident or wrong_secret); ``ident`` is
        the text ident when valid UTF-8 (feeds the failed-AUTH limiter), ``shown`` it escaped."""

    def refused(self, refusal: Refusal, ident: str | None) -> None:
        """Count a refusal (the metrics of ``metrics.REFUSALS``)."""


# A payload is shorter than 2**32 bytes (a frame's length is a u32), so (size - 1) has
# at most 32 bits: 33 size classes. A list per publishing connection and channel, so
# not 64 (248 bytes more each, traversed by every garbage collection that sees it).
SIZE_CLASSES = 33


class PublishStats:
    """Publishes of one ident to one channel: plain ints bumped on the hot path."""

    __slots__ = ("bits", "bytes", "count")

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        # bits[n]: payloads whose (size - 1) has bit_length n, i.e. 2**(n-1) < size <= 2**n
        # (size 0 and 1 land in bits[1] and bits[0]); so "size <= 2**k" is sum(bits[:k+1]).
        self.bits = [0] * SIZE_CLASSES

    def merge(self, other: PublishStats) -> None:
        # Once per closed connection and channel. Usually every payload fell in one
        # size class: that one slot is added (two scans in C, no list built); else
        # map(add), about three times cheaper than a comprehension over 64 pairs.
        count = other.count
        self.count += count
        self.bytes += other.bytes
        bits = other.bits
        if bits.count(0) == len(bits) - 1 and count in bits:  # (the slots add up to count)
            self.bits[bits.index(count)] += count
        else:
            self.bits = list(map(operator.add, self.bits, bits))


class Session(Generic[_O]):
    __slots__ = (
        "_budget",
        "_decoder",
        "_denials",
        "_digest",
        "_ident_text",
        "_max_denials",
        "_max_subscriptions",
        "close_reason",
        "ident",
        "ident_bytes",
        "nonce",
        "output",
        "owner",
        "peer",
        "port",
        "pubchans",
        "publish_stats",
        "secret_seen",
        "state",
        "subchans",
        "subscriptions",
    )

    def __init__(
        self,
        output: _O,
        port: Port[_O],
        nonce: bytes,
        frame_limits: FrameLimits,
        *,
        max_subscriptions: int,
        max_denials: int,
        budget: int,
        peer: str = "?",
    ) -> None:
        self.output = output
        self.port = port
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
        # A shared empty set until the first SUBSCRIBE: most connections are sensors
        # that never subscribe, and an empty set() is 216 bytes.
        self.subscriptions: set[bytes] | frozenset[bytes] = _NO_SUBSCRIPTIONS
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

    def receive(self, data: bytes) -> bool | NeedKey:
        """Handle a read; True when work is left for a later turn (pause reading, then
        ``resume``); ``NeedKey`` when an AUTH waits for its key."""
        self._decoder.receive(data)
        if self.state == AUTHING:
            return False  # frames behind AUTH wait for the key
        return self.resume()

    def resume(self) -> bool | NeedKey:
        """Handle buffered frames up to the budget; True when some are left, ``NeedKey`` at an AUTH."""
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
                    return self._start_auth(item)
        except UnexpectedOpcode as e:
            if self.state == PRE_AUTH:
                self._refuse(CloseReason.NOT_AUTHENTICATED, "first message was not AUTH", Refusal.FIRST_NOT_AUTH)
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
        return self.port.publish(channel, run.data, frames)

    def _deny_publish(self, ident: bytes, channel: bytes) -> None:
        if ident != self.ident_bytes:
            self._deny_spoof("publish", ident, Refusal.IDENT_MISMATCH_PUB)
        else:
            self.port.refused(Refusal.NO_PUB_PERMISSION, self.ident)
            self._deny(f"accessfail: {printable(self.ident_bytes)} may not publish to channel {quoted(channel)}")

    def _deny_spoof(self, verb: str, ident: bytes, refusal: Refusal) -> None:
        self.port.refused(refusal, self.ident)
        self._deny(f"identfail: {verb} as {quoted(ident)} refused; this connection is {quoted(self.ident_bytes)}")

    def _control(self, frame: Auth | Publish | Subscribe | Unsubscribe) -> None:
        """A READY session's control frames: the one ``match`` of the broker's direction."""
        match frame:
            case Subscribe(ident=ident, channel=channel):
                if ident != self.ident_bytes:
                    self._deny_spoof("subscribe", ident, Refusal.IDENT_MISMATCH_SUB)
                elif channel not in self.subchans:
                    self.port.refused(Refusal.NO_SUB_PERMISSION, self.ident)
                    shown = printable(self.ident_bytes)
                    self._deny(f"accessfail: {shown} may not subscribe to channel {quoted(channel)}")
                elif channel not in self.subscriptions:
                    if len(self.subscriptions) >= self._max_subscriptions:
                        self.port.refused(Refusal.MAX_SUBSCRIPTIONS, self.ident)
                        self._deny(
                            f"limit: subscription to {quoted(channel)} refused; at most "
                            f"{self._max_subscriptions} channels per connection"
                        )
                        return
                    subscriptions = self.subscriptions
                    if isinstance(subscriptions, set):
                        subscriptions.add(channel)
                    else:
                        self.subscriptions = {channel}
                    self.port.subscribe(channel, self.output)
            case Unsubscribe(ident=ident, channel=channel):
                if ident != self.ident_bytes:
                    self._deny_spoof("unsubscribe", ident, Refusal.IDENT_MISMATCH_UNSUB)
                elif channel in self.subscriptions:
                    self._subscribed().discard(channel)
                    self.port.unsubscribe(channel, self.output)
            case Auth():
                message = "already authenticated; a second AUTH is refused"
                self._refuse(CloseReason.SECOND_AUTH, message, Refusal.SECOND_AUTH)
            case _:  # pragma: no cover - the decoder yields runs for PUBLISH and refuses every other opcode
                raise AssertionError(frame)

    # --- AUTH -----------------------------------------------------------------------

    def _start_auth(self, frame: Auth) -> NeedKey | bool:
        self.state = AUTHING
        self.ident_bytes = frame.ident
        self._digest = frame.digest
        try:
            self._ident_text = frame.ident.decode("utf-8")
        except UnicodeDecodeError:
            self.key_found(None)  # can never match a key; costs what a wrong secret costs
            return False
        return _new(NeedKey, (self._ident_text,))  # NeedKey(...) without the Python-level __new__

    def key_found(self, key: Key | None) -> bool:
        """The key store's answer for the ident of the AUTH. True: verified, the session
        is READY with the key's channels (the caller records it, then calls ``resume``
        for the frames behind the AUTH); False: refused, or closed meanwhile."""
        if self.state != AUTHING:
            return False  # closed (timeout, shutdown) while the store looked
        secret = key.secret.encode("utf-8") if key is not None else _DUMMY_SECRET
        if key is None or not verify(self.nonce, secret, self._digest):
            shown = printable(self.ident_bytes)
            # One metric reason for both: /metrics must not tell which idents exist.
            why = "unknown_ident" if key is None else "wrong_secret"
            self.port.auth_failed(self.output, self._ident_text, shown, why)
            self._refuse(CloseReason.AUTH_FAILED, f"Authentication failed for {shown}", Refusal.AUTH_FAILED)
            return False
        self.ident = key.ident
        # Verified: the AUTH's digest and decoded ident are not needed again (about
        # 100 bytes a connection).
        self._digest = b""
        self._ident_text = None
        self.owner = key.owner or ""
        self.secret_seen = key.secret
        self.state = READY
        self._decoder.accept(CLIENT_TO_BROKER)
        self.port.left_pre_auth(self.output)
        self.apply_key(key)
        return True

    def key_unavailable(self, why: str) -> None:
        """The key store could not answer."""
        if self.state != AUTHING:
            return
        self._refuse(
            CloseReason.AUTH_UNAVAILABLE,
            f"Authentication failed for {printable(self.ident_bytes)}: the key store is unavailable, try again later",
            Refusal.AUTH_UNAVAILABLE,
        )

    def rate_limited(self, block_s: float) -> None:
        """Refused without a lookup or a verification: this address (or address and ident) is
        blocked for ``block_s`` more seconds."""
        self._refuse(
            CloseReason.AUTH_RATE_LIMITED,
            f"Authentication failed for {printable(self.ident_bytes)}: too many failed attempts, "
            f"try again in {block_s:g} s",
            Refusal.AUTH_RATE_LIMITED,
        )

    def auth_timeout(self, timeout_s: float) -> None:
        if self.state in (PRE_AUTH, AUTHING):
            self._refuse(CloseReason.AUTH_TIMEOUT, f"no valid AUTH within {timeout_s:g} s", Refusal.AUTH_TIMEOUT)

    # --- changes from the key store (revocation) ---------------------------------------

    def apply_key(self, key: Key) -> set[bytes]:
        """Take the key's channels; returns the subscriptions they no longer allow (now dropped).

        The channel sets are interned by the broker: 10,000 sensors with the
        same 50 channels hold one set, not 10,000."""
        port = self.port
        self.pubchans = port.channel_set(key.pubchans)
        self.subchans = subchans = port.channel_set(key.subchans)
        lost = set(self.subscriptions - subchans)
        for channel in lost:
            self._subscribed().discard(channel)
            port.unsubscribe(channel, self.output)
        return lost

    def _subscribed(self) -> set[bytes]:
        """The subscriptions, when there is one (the shared empty set is never changed)."""
        subscriptions = self.subscriptions
        assert isinstance(subscriptions, set)
        return subscriptions

    # --- refusing and closing ---------------------------------------------------------------

    def _deny(self, message: str) -> None:
        """A refused frame: ERROR, no effect, connection stays open up to the denial cap."""
        self._denials += 1
        if self._denials > self._max_denials:
            self.port.refused(Refusal.TOO_MANY_DENIALS, self.ident)
            self.close(CloseReason.TOO_MANY_DENIALS, f"more than {self._max_denials} refused frames on this connection")
            return
        log.debug("%s (%s): %s", self.peer, self.ident, message)
        self.output.send(encode_error(message))

    def _protocol_error(self, e: ProtocolError) -> None:
        if e.reason == "frame_too_large":
            self._refuse(CloseReason.FRAME_TOO_LARGE, str(e), Refusal.FRAME_TOO_LARGE)
        else:
            self._refuse(CloseReason.BAD_FRAME, str(e), Refusal.BAD_FRAME)

    def _refuse(self, reason: CloseReason, message: str, refusal: Refusal) -> None:
        self.port.refused(refusal, self.ident)
        self.close(reason, message)

    def close(self, reason: CloseReason, message: str | None, *, abort: bool = False) -> None:
        """Close with a recorded reason; ``message`` goes out in an ERROR frame first. Idempotent."""
        if self.state == CLOSED:
            return
        was = self.state
        self.state = CLOSED
        self.close_reason = reason
        self._decoder.clear()  # drop what was buffered
        output, port = self.output, self.port
        if was != READY:
            port.left_pre_auth(output)
        for channel in self.subscriptions:
            port.unsubscribe(channel, output)
        self.subscriptions = _NO_SUBSCRIPTIONS
        error = None
        if message is not None and not abort:
            token = ERROR_TOKEN.get(reason, "error")
            error = encode_error(message if message.startswith(f"{token}:") else f"{token}: {message}")
        output.close_transport(reason, error, abort)
