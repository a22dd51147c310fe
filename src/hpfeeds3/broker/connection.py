"""Connection: one ``asyncio.Protocol`` per client.

Lifecycle: accept → INFO (4-byte nonce) → AUTH verified within the deadline →
PUBLISH / SUBSCRIBE / UNSUBSCRIBE with per-ident permissions → closed with a
``CloseReason`` (logged, counted, and in the ERROR frame when there is one).

Rules kept here:
- Frames are parsed with offsets into one buffer; consumed bytes are dropped
  once per read. A header is checked before its body is buffered.
- Consecutive PUBLISH frames of one read with the same ident and channel form a
  *run*: permissions are checked once per run and the run's bytes, unchanged,
  are handed to the router with one write per subscriber.
- Frames behind AUTH wait until the key is verified, then are processed in
  order; when the store has to be awaited (PostgreSQL, a locked sqlite),
  reading is paused meanwhile.
- Nothing is sent on success (not after AUTH, not after SUBSCRIBE).
- A subscriber that cannot keep up is cut (``slow_consumer``) before it costs
  memory or slows anyone else: see ``_watch_backlog``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..protocol import (
    HEADER,
    HEADER_LEN,
    OP_AUTH,
    OP_PUBLISH,
    Auth,
    ProtocolError,
    Publish,
    Subscribe,
    Unsubscribe,
    check_header,
    encode_error,
    encode_info,
    new_nonce,
    parse_body,
    verify,
)
from . import metrics
from .auth.base import AccessKey, AuthUnavailable, WouldBlock
from .metrics import PublishStats
from .reasons import ERROR_TOKEN, CloseReason
from .text import printable
from .tuning import BACKLOG_CHECK_S, BACKLOG_HIGH_BYTES, BACKLOG_LOW_BYTES, CHECKED_FRAMES_PER_TURN, CLOSE_FLUSH_S

if TYPE_CHECKING:
    from .state import Broker

log = logging.getLogger("hpfeeds3.broker.connection")

_unpack_header = HEADER.unpack_from

# Connection states
_PRE_AUTH, _AUTHING, _READY, _CLOSED = range(4)

# A secret no key can have: verifying against it makes an unknown ident cost
# exactly what a wrong secret costs.
_DUMMY_SECRET = b"\x00unknown-ident\x00" * 2


class Connection(asyncio.Protocol):
    __slots__ = (
        "_auth_deadline",
        "_backlog_timer",
        "_buf",
        "_denials",
        "_eof_pending",
        "_last_progress",
        "_last_queued",
        "_max_len",
        "_sent_at_check",
        "_soft_since",
        "_state",
        "_turn_pending",
        "broker",
        "close_reason",
        "ident",
        "ident_bytes",
        "nonce",
        "owner",
        "peer",
        "peer_host",
        "pubchans",
        "publish_stats",
        "received_bytes",
        "secret_seen",
        "sent_bytes",
        "subchans",
        "subscriptions",
        "transport",
    )

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_host = "?"
        self.nonce = new_nonce()
        self.ident: str | None = None
        self.ident_bytes = b""
        self.owner = ""
        self.secret_seen = ""  # to notice a rotated secret (revocation)
        self.pubchans: frozenset[bytes] = frozenset()
        self.subchans: frozenset[bytes] = frozenset()
        self.subscriptions: set[bytes] = set()
        self.publish_stats: dict[bytes, PublishStats] = {}
        self.received_bytes = 0
        self.sent_bytes = 0
        self.close_reason: CloseReason | None = None
        self._state = _PRE_AUTH
        self._buf = b""
        self._max_len = broker.frame_table
        self._denials = 0
        self._eof_pending = False
        self._turn_pending = False
        self._auth_deadline: asyncio.TimerHandle | None = None
        self._backlog_timer: asyncio.TimerHandle | None = None
        self._soft_since: float | None = None
        self._last_progress = 0.0
        self._last_queued = 0
        self._sent_at_check = 0

    # --- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        assert self.transport is not None
        broker = self.broker
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            host = self.peer_host = peername[0]
            self.peer = f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
        broker.connections.add(self)
        broker.unauthenticated += 1
        metrics.CONNECTION_MADE.inc()
        log.info("connected from %s", self.peer, extra={"event": "connected", "peer": self.peer})

        limits = broker.config.limits
        if len(broker.connections) > broker.max_connections:
            metrics.LIMIT_REJECTIONS.labels("max_connections").inc()
            self.close(CloseReason.TOO_MANY_CONNECTIONS, f"too many connections (limit {broker.max_connections})")
            return
        if broker.unauthenticated > limits.max_unauthenticated:
            metrics.LIMIT_REJECTIONS.labels("max_unauthenticated").inc()
            self.close(
                CloseReason.TOO_MANY_UNAUTHENTICATED,
                f"too many unauthenticated connections (limit {limits.max_unauthenticated})",
            )
            return

        transport = self.transport
        transport.set_write_buffer_limits(high=BACKLOG_HIGH_BYTES, low=BACKLOG_LOW_BYTES)
        transport.write(encode_info(broker.name_bytes, self.nonce))
        self._auth_deadline = broker.loop.call_later(limits.auth_timeout_s, self._on_auth_timeout)

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        state = self._state
        if state == _READY:
            self._process(self._buf + data if self._buf else data)
        elif state == _PRE_AUTH:
            self._process_pre_auth(self._buf + data if self._buf else data)
        elif state == _AUTHING:
            # Reading is paused; a transport may still hand over what it had.
            buf = self._buf + data
            if len(buf) > self.broker.frame_limits.max_publish_frame_bytes + 65536:
                metrics.LIMIT_REJECTIONS.labels("pre_auth_buffer").inc()
                self.close(CloseReason.FRAME_TOO_LARGE, "too much data before authentication completed")
                return
            self._buf = buf

    def eof_received(self) -> bool:
        # Half-close: frames already received (AUTH + PUBLISH + FIN in one
        # segment) are still processed; the transport closes once we are done.
        if self._state == _AUTHING:
            self._eof_pending = True
            return True  # keep the transport until the pending AUTH is handled
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        broker = self.broker
        if self.close_reason is None:
            self.close_reason = CloseReason.CLIENT_CLOSED if exc is None else CloseReason.CONNECTION_RESET
        self._cancel_timers()
        self._drop_subscriptions()
        if self in broker.connections:
            broker.connections.discard(self)
            if self._state in (_PRE_AUTH, _AUTHING):
                broker.unauthenticated -= 1
            broker.retire(self)
            if self.ident is not None:
                broker.by_ident_discard(self)
        self._state = _CLOSED
        # Break the protocol <-> transport cycle so a closed connection is freed
        # by reference counting, not by a later (long) cyclic GC pass.
        self.transport = None
        ident = self.ident or ""
        metrics.CONNECTION_LOST.labels(ident).inc()
        metrics.CONNECTIONS_CLOSED.labels(self.close_reason.value).inc()
        log.info(
            "closed %s%s: %s",
            self.peer,
            f" ({self.ident})" if self.ident else "",
            self.close_reason.value,
            extra={"event": "closed", "peer": self.peer, "ident": self.ident, "reason": self.close_reason.value},
        )

    def pause_writing(self) -> None:
        # The subscriber's queue passed the backlog mark: watch its progress.
        if self._backlog_timer is None and self._state != _CLOSED:
            now = self.broker.loop.time()
            self._last_progress = now
            self._last_queued = self.write_buffer_size()
            self._sent_at_check = self.sent_bytes
            metrics.SEND_BUFFER_DEADLINE_START.labels(self.ident or "").inc()
            self._backlog_timer = self.broker.loop.call_later(BACKLOG_CHECK_S, self._watch_backlog)

    def resume_writing(self) -> None:
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
            self._backlog_timer = None
            self._soft_since = None
            metrics.SEND_BUFFER_DEADLINE_RECOVER.labels(self.ident or "").inc()

    # --- the router's side ------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(data)
        self.sent_bytes += len(data)
        if self._backlog_timer is not None and transport.get_write_buffer_size() > self.broker.send_hard_bytes:
            self._cut_slow_consumer("outgoing buffer over its hard bound")

    # --- introspection for metrics --------------------------------------------------

    def write_buffer_size(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    def read_buffer_size(self) -> int:
        return len(self._buf)

    # --- frames before AUTH ------------------------------------------------------------

    def _process_pre_auth(self, buf: bytes) -> None:
        if len(buf) < HEADER_LEN:
            self._buf = buf
            return
        length, opcode = _unpack_header(buf, 0)
        if opcode != OP_AUTH:
            self._refuse(CloseReason.NOT_AUTHENTICATED, "first message was not AUTH", "invalid-first-message")
            return
        try:
            check_header(length, opcode, self._max_len)
            if len(buf) < length:
                self._buf = buf
                return
            frame = parse_body(OP_AUTH, buf, HEADER_LEN, length)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        assert isinstance(frame, Auth)
        self._buf = buf[length:]
        self._state = _AUTHING
        self._start_auth(frame.ident, frame.digest)

    def _start_auth(self, ident_bytes: bytes, digest: bytes) -> None:
        """Verify at once when the store can answer without waiting (sqlite, env,
        JSON); otherwise pause reading and finish in a task (PostgreSQL, a
        locked sqlite). Either way, pipelined frames wait in ``_buf``."""
        broker = self.broker
        try:
            ident: str | None = ident_bytes.decode("utf-8")
        except UnicodeDecodeError:
            ident = None  # can never match a key
        if ident is None:
            self._finish_auth(None, ident_bytes, digest, None)
            return
        if self._rate_limited(ident):
            return  # refused without a lookup or a verification: guessing costs nothing
        try:
            key = broker.lookup_now(ident)
        except WouldBlock:
            assert self.transport is not None
            self.transport.pause_reading()
            broker.spawn(self._authenticate(ident, ident_bytes, digest))
            return
        except AuthUnavailable as e:
            self._auth_unavailable(ident, e)
            return
        self._finish_auth(ident, ident_bytes, digest, key)

    async def _authenticate(self, ident: str, ident_bytes: bytes, digest: bytes) -> None:
        try:
            key = await self.broker.lookup(ident)
        except AuthUnavailable as e:
            if self._state == _AUTHING:
                self._auth_unavailable(ident, e)
            return
        if self._state != _AUTHING:
            return  # closed (timeout, shutdown) while we looked
        if self._rate_limited(ident):
            return  # blocked by failures that finished while we looked: still no verification
        self._finish_auth(ident, ident_bytes, digest, key)

    def _auth_unavailable(self, ident: str, e: AuthUnavailable) -> None:
        log.warning("auth store unavailable for %s from %s: %s", ident, self.peer, e)
        metrics.AUTH_FAILURES.labels("store_unavailable").inc()
        self._refuse(
            CloseReason.AUTH_UNAVAILABLE,
            f"Authentication failed for {ident}: the key store is unavailable, try again later",
            "auth-unavailable",
        )

    def _finish_auth(self, ident: str | None, ident_bytes: bytes, digest: bytes, key: AccessKey | None) -> None:
        broker = self.broker
        limiter = broker.auth_limiter
        secret = key.secret.encode("utf-8") if key is not None else _DUMMY_SECRET
        ok = verify(self.nonce, secret, digest) and key is not None
        if not ok:
            reason = "unknown_ident" if key is None else "wrong_secret"
            metrics.AUTH_FAILURES.labels(reason).inc()
            if ident is not None and limiter.enabled:
                block = limiter.record_failure(self.peer_host, ident, broker.loop.time())
                if block is not None:
                    log.warning(
                        "refusing for %g s: %s",
                        limiter.limits.block_s,
                        block,
                        extra={"event": "auth_blocked", "peer": self.peer, "reason": "auth_rate_limited"},
                    )
            log.info(
                "authentication failed for %s from %s (%s)",
                printable(ident_bytes),
                self.peer,
                reason,
                extra={"event": "auth_failed", "peer": self.peer, "reason": reason},
            )
            self._refuse(
                CloseReason.AUTH_FAILED, f"Authentication failed for {printable(ident_bytes)}", "invalid-secret"
            )
            return
        assert key is not None
        self._become_ready(key, ident_bytes)

    def _rate_limited(self, ident: str) -> bool:
        """Refuse (and return True) when this address, or this address and ident, is blocked."""
        broker = self.broker
        limiter = broker.auth_limiter
        if not limiter.enabled or not limiter.blocked(self.peer_host, ident, broker.loop.time()):
            return False
        metrics.AUTH_FAILURES.labels("rate_limited").inc()
        metrics.LIMIT_REJECTIONS.labels("auth_failures").inc()
        self._refuse(
            CloseReason.AUTH_RATE_LIMITED,
            f"Authentication failed for {ident}: too many failed attempts, try again later",
            "auth-rate-limited",
        )
        return True

    def _become_ready(self, key: AccessKey, ident_bytes: bytes) -> None:
        broker = self.broker
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None
        self.ident = key.ident
        self.ident_bytes = ident_bytes
        self.owner = key.owner or ""
        self.secret_seen = key.secret
        self.apply_key(key)
        self._state = _READY
        broker.unauthenticated -= 1
        broker.by_ident_add(self)
        metrics.CONNECTION_READY.labels(key.ident).inc()
        log.info(
            "%s authenticated as %s",
            self.peer,
            key.ident,
            extra={"event": "authenticated", "peer": self.peer, "ident": key.ident},
        )
        transport = self.transport
        assert transport is not None
        buf, self._buf = self._buf, b""
        if buf:
            self._process(buf)
        if self._state == _READY and not self._turn_pending:
            if transport.is_closing():
                return
            # eof_received returned True while AUTH was pending: honour the FIN now.
            if self._eof_pending:
                transport.close()
                return
            transport.resume_reading()

    def apply_key(self, key: AccessKey) -> None:
        # Shared across the connections of one key: 10,000 sensors with the same
        # 50 channels hold one set, not 10,000.
        self.pubchans = self.broker.channel_set(key.pubchans)
        self.subchans = self.broker.channel_set(key.subchans)

    # --- frames after AUTH: the hot path --------------------------------------------------

    def _process(self, buf: bytes) -> None:
        """Handle every complete frame in ``buf``; keep the incomplete tail."""
        end = len(buf)
        pos = 0
        max_publish = self._max_len[OP_PUBLISH]
        # The current run of PUBLISH frames: [run_start, run_end) share run_prefix
        # (str8 ident + str8 channel) and go to run_channel.
        # Runs are contiguous, so a run always ends where ``pos`` stands when it is flushed.
        run_start = run_count = run_overhead = run_cut = 0
        run_prefix = b""
        run_channel = b""
        run_bits: list[int] = []
        checked = 0
        yielded = False
        try:
            while end - pos >= HEADER_LEN:
                length, opcode = _unpack_header(buf, pos)
                if opcode == OP_PUBLISH and HEADER_LEN < length <= max_publish:
                    frame_end = pos + length
                    if frame_end > end:
                        break
                    if run_count and buf.startswith(run_prefix, pos + HEADER_LEN, frame_end):
                        # Same ident and channel as the frame before: extend the run.
                        # (The per-frame work is this: a size bucket for the histogram.)
                        run_count += 1
                        run_bits[(length - run_cut).bit_length()] += 1
                        pos = frame_end
                        continue
                    # A new run: flush the old one, then check this frame fully.
                    checked += 1
                    if checked > CHECKED_FRAMES_PER_TURN:
                        yielded = True
                        break
                    if run_count:
                        self._publish_run(run_channel, buf[run_start:pos], run_count, run_overhead)
                        run_count = 0
                    frame = parse_body(OP_PUBLISH, buf, pos + HEADER_LEN, frame_end)
                    assert isinstance(frame, Publish)
                    if self._publish_allowed(frame):
                        run_channel = frame.channel
                        run_prefix = buf[pos + HEADER_LEN : pos + HEADER_LEN + 2 + len(frame.ident) + len(run_channel)]
                        run_overhead = HEADER_LEN + len(run_prefix)
                        run_cut = run_overhead + 1  # bits[(size - 1).bit_length()]: see PublishStats
                        stats = self.publish_stats.get(run_channel)
                        if stats is None:
                            stats = self.publish_stats[run_channel] = PublishStats()
                        run_bits = stats.bits
                        run_bits[(length - run_cut).bit_length()] += 1
                        run_start, run_count = pos, 1
                    elif self._state != _READY:
                        return
                    pos = frame_end
                    continue

                # Any other frame ends the current run.
                if run_count:
                    self._publish_run(run_channel, buf[run_start:pos], run_count, run_overhead)
                    run_count = 0
                checked += 1
                if checked > CHECKED_FRAMES_PER_TURN:
                    yielded = True
                    break
                check_header(length, opcode, self._max_len)
                if end - pos < length:
                    break
                self._handle_control(opcode, buf, pos + HEADER_LEN, pos + length)
                pos += length
                if self._state != _READY:
                    return
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if run_count:
            # Most reads are one run of whole frames: hand over the read itself.
            self._publish_run(
                run_channel, buf if run_start == 0 and pos == end else buf[run_start:pos], run_count, run_overhead
            )
        if self._state == _READY:
            self._buf = buf[pos:] if pos < end else b""
            if yielded:
                self._yield_turn()

    def _yield_turn(self) -> None:
        """Too many frames in one read: finish them in a later loop turn."""
        self._turn_pending = True
        assert self.transport is not None
        self.transport.pause_reading()
        self.broker.loop.call_soon(self._continue_turn)

    def _continue_turn(self) -> None:
        self._turn_pending = False
        if self._state != _READY:
            return
        buf, self._buf = self._buf, b""
        if buf:
            self._process(buf)
        transport = self.transport
        if self._state != _READY or self._turn_pending or transport is None or transport.is_closing():
            return
        if self._eof_pending:
            transport.close()  # the FIN that came with the AUTH, now that every frame is done
        elif self.broker.state != "stopping":
            transport.resume_reading()

    def _publish_run(self, channel: bytes, data: bytes, count: int, overhead: int) -> None:
        """Count a run of ``count`` frames (``overhead`` bytes of header each) and fan it out."""
        stats = self.publish_stats[channel]
        stats.count += count
        stats.bytes += len(data) - count * overhead
        self.broker.router.publish(channel, data, count)

    def _publish_allowed(self, frame: Publish) -> bool:
        if frame.ident != self.ident_bytes:
            metrics.CONNECTION_ERROR.labels(self.ident or "", "ident-mismatch-pub").inc()
            self._deny(f"identfail: publish as {printable(frame.ident)!r} refused; this connection is {self.ident!r}")
            return False
        if frame.channel not in self.pubchans:
            metrics.CONNECTION_ERROR.labels(self.ident or "", "no-pub-permission").inc()
            self._deny(f"accessfail: {self.ident} may not publish to channel {printable(frame.channel)!r}")
            return False
        return True

    def _handle_control(self, opcode: int, buf: bytes, start: int, end: int) -> None:
        frame = parse_body(opcode, buf, start, end)
        if isinstance(frame, Subscribe):
            channel = frame.channel
            if frame.ident != self.ident_bytes:
                metrics.CONNECTION_ERROR.labels(self.ident or "", "ident-mismatch-sub").inc()
                self._deny(
                    f"identfail: subscribe as {printable(frame.ident)!r} refused; this connection is {self.ident!r}"
                )  # type: ignore[union-attr]
            elif channel not in self.subchans:
                metrics.CONNECTION_ERROR.labels(self.ident or "", "no-sub-permission").inc()
                self._deny(f"accessfail: {self.ident} may not subscribe to channel {printable(channel)!r}")
            elif channel not in self.subscriptions:
                if len(self.subscriptions) >= self.broker.config.limits.max_subscriptions:
                    metrics.LIMIT_REJECTIONS.labels("max_subscriptions").inc()
                    self._deny(
                        f"limit: subscription to {printable(channel)!r} refused; at most "
                        f"{self.broker.config.limits.max_subscriptions} channels per connection"
                    )
                    return
                self.subscriptions.add(channel)
                self.broker.router.subscribe(channel, self)
        elif isinstance(frame, Unsubscribe):
            channel = frame.channel
            if channel in self.subscriptions:
                self.subscriptions.discard(channel)
                self.broker.router.unsubscribe(channel, self)
        elif opcode == OP_AUTH:
            self._refuse(CloseReason.SECOND_AUTH, "already authenticated; a second AUTH is refused", "second-auth")
        else:  # pragma: no cover - check_header refused every other opcode
            raise AssertionError(opcode)

    def unsubscribe_channels(self, channels: set[bytes]) -> None:
        for channel in channels & self.subscriptions:
            self.subscriptions.discard(channel)
            self.broker.router.unsubscribe(channel, self)

    # --- refusing ----------------------------------------------------------------------------

    def _deny(self, message: str) -> None:
        """A refused frame: ERROR, no effect, connection stays open up to the denial cap."""
        self._denials += 1
        limit = self.broker.config.limits.max_denials
        if self._denials > limit:
            metrics.LIMIT_REJECTIONS.labels("max_denials").inc()
            self.close(CloseReason.TOO_MANY_DENIALS, f"more than {limit} refused frames on this connection")
            return
        log.debug("%s (%s): %s", self.peer, self.ident, message)
        assert self.transport is not None
        self.transport.write(encode_error(message))

    def _protocol_error(self, e: ProtocolError) -> None:
        reason = CloseReason.FRAME_TOO_LARGE if e.reason == "frame_too_large" else CloseReason.BAD_FRAME
        if reason is CloseReason.FRAME_TOO_LARGE:
            metrics.LIMIT_REJECTIONS.labels("max_message_size").inc()
        metrics.CONNECTION_ERROR.labels(self.ident or "", reason.value).inc()
        self.close(reason, str(e))

    def _refuse(self, reason: CloseReason, message: str, category: str) -> None:
        metrics.CONNECTION_ERROR.labels(self.ident or "", category).inc()
        self.close(reason, message)

    def _on_auth_timeout(self) -> None:
        self._auth_deadline = None
        if self._state in (_PRE_AUTH, _AUTHING):
            metrics.AUTH_FAILURES.labels("timeout").inc()
            self._refuse(
                CloseReason.AUTH_TIMEOUT,
                f"no valid AUTH within {self.broker.config.limits.auth_timeout_s:g} s",
                "auth-timeout",
            )

    def _watch_backlog(self) -> None:
        """Runs every BACKLOG_CHECK_S while the subscriber is backlogged."""
        self._backlog_timer = None
        if self._state == _CLOSED or self.transport is None or self.transport.is_closing():
            return
        broker = self.broker
        limits = broker.config.limits
        now = broker.loop.time()
        queued = self.transport.get_write_buffer_size()
        added = self.sent_bytes - self._sent_at_check
        drained = self._last_queued + added - queued
        self._last_queued, self._sent_at_check = queued, self.sent_bytes
        if drained > 0:
            self._last_progress = now
        if queued >= limits.send_buffer_soft_bytes:
            if self._soft_since is None:
                self._soft_since = now
        else:
            self._soft_since = None
        if queued > limits.send_buffer_hard_bytes:
            self._cut_slow_consumer("outgoing buffer over its hard bound")
        elif now - self._last_progress >= limits.send_stall_timeout_s:
            self._cut_slow_consumer(f"nothing drained for {limits.send_stall_timeout_s:g} s")
        elif self._soft_since is not None and now - self._soft_since >= limits.send_buffer_soft_window_s:
            self._cut_slow_consumer(f"outgoing buffer over its soft bound for {limits.send_buffer_soft_window_s:g} s")
        else:
            self._backlog_timer = broker.loop.call_later(BACKLOG_CHECK_S, self._watch_backlog)

    def _cut_slow_consumer(self, why: str) -> None:
        metrics.SLOW_CONSUMERS.inc()
        queued = self.write_buffer_size()
        log.warning(
            "cutting slow consumer %s (%s): %s, %d bytes queued",
            self.peer,
            self.ident,
            why,
            queued,
            extra={"event": "slow_consumer", "peer": self.peer, "ident": self.ident, "reason": "slow_consumer"},
        )
        # Its queue is stuck, so an ERROR behind it would never arrive: abort.
        self.close(CloseReason.SLOW_CONSUMER, None, abort=True)

    # --- closing ---------------------------------------------------------------------------------

    def close(self, reason: CloseReason, message: str | None, *, abort: bool = False) -> None:
        """Close with a recorded reason; ``message`` goes out in an ERROR frame first."""
        if self._state == _CLOSED or self.transport is None:
            return
        self.close_reason = reason
        if self._state in (_PRE_AUTH, _AUTHING) and self in self.broker.connections:
            # connection_lost will see _CLOSED: leave the pre-auth count here.
            self.broker.unauthenticated -= 1
        self._state = _CLOSED
        self._buf = b""
        self._cancel_timers()
        self._drop_subscriptions()
        transport = self.transport
        if abort:
            transport.abort()
            return
        if message is not None:
            token = ERROR_TOKEN.get(reason, "error")
            text = message if message.startswith(f"{token}:") else f"{token}: {message}"
            transport.write(encode_error(text))
        transport.close()
        if transport.get_write_buffer_size():
            # A peer that does not read must not keep the socket forever.
            self.broker.loop.call_later(CLOSE_FLUSH_S, transport.abort)

    def _cancel_timers(self) -> None:
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
            self._backlog_timer = None

    def _drop_subscriptions(self) -> None:
        if self.subscriptions:
            router = self.broker.router
            for channel in self.subscriptions:
                router.unsubscribe(channel, self)
            self.subscriptions = set()
