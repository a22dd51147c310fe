"""Connection: the ``asyncio.Protocol`` around one client's ``Session``.

The session (``session.py``) decides everything about the client's frames;
this class only moves bytes and carries out its actions: it owns the
transport, the timers (AUTH deadline, backlog watch), the key-store lookup
(at once when the store can answer without waiting, else in a task with
reading paused), the failed-AUTH limiter, and the outgoing buffer with its
slow-consumer policy.

Rules kept here:
- A subscriber that cannot keep up is cut (``slow_consumer``) before it costs
  memory or slows anyone else: see ``_watch_backlog``.
- Every entry point (a read, the end of a lookup, a timer, a delivery) runs
  inside the internal-error boundary: an exception closes this connection
  alone with ``internal_error`` (ERROR to the client, traceback in the log).
- When one read holds more work than one loop turn should do, reading is
  paused and the rest is handled in later turns, in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..protocol import encode_info, new_nonce
from . import metrics
from .auth import AccessKey, AuthUnavailable, WouldBlock
from .metrics import PublishStats
from .reasons import CloseReason
from .session import AUTHING, CLOSED, READY, Session
from .tuning import BACKLOG_CHECK_S, BACKLOG_HIGH_BYTES, BACKLOG_LOW_BYTES, CHECKED_FRAMES_PER_TURN, CLOSE_FLUSH_S

if TYPE_CHECKING:
    from .state import Broker

log = logging.getLogger("hpfeeds3.broker.connection")

# Bytes a client may send behind its AUTH while the key store is asked:
# one largest frame and a margin (reading is paused meanwhile).
_AUTHING_BUFFER_MARGIN = 65536


class Connection(asyncio.Protocol):
    __slots__ = (
        "_auth_deadline",
        "_backlog_timer",
        "_eof_pending",
        "_last_progress",
        "_last_queued",
        "_lost",
        "_sent_at_check",
        "_soft_since",
        "_turn_pending",
        "broker",
        "peer",
        "peer_host",
        "received_bytes",
        "sent_bytes",
        "session",
        "transport",
    )

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_host = "?"
        limits = broker.config.limits
        self.session = Session(
            self,
            new_nonce(),
            broker.frame_limits,
            max_subscriptions=limits.max_subscriptions,
            max_denials=limits.max_denials,
            budget=CHECKED_FRAMES_PER_TURN,
        )
        self.received_bytes = 0
        self.sent_bytes = 0
        self._lost = False
        self._eof_pending = False
        self._turn_pending = False
        self._auth_deadline: asyncio.TimerHandle | None = None
        self._backlog_timer: asyncio.TimerHandle | None = None
        self._soft_since: float | None = None
        self._last_progress = 0.0
        self._last_queued = 0
        self._sent_at_check = 0

    # --- what the rest of the broker reads (metrics, revocation, shutdown) -------

    @property
    def ident(self) -> str | None:
        return self.session.ident

    @property
    def owner(self) -> str:
        return self.session.owner

    @property
    def nonce(self) -> bytes:
        return self.session.nonce

    @property
    def secret_seen(self) -> str:
        return self.session.secret_seen

    @property
    def subscriptions(self) -> set[bytes]:
        return self.session.subscriptions

    @property
    def publish_stats(self) -> dict[bytes, PublishStats]:
        return self.session.publish_stats

    @property
    def pubchans(self) -> frozenset[bytes]:
        return self.session.pubchans

    @property
    def subchans(self) -> frozenset[bytes]:
        return self.session.subchans

    @property
    def close_reason(self) -> CloseReason | None:
        return self.session.close_reason

    def write_buffer_size(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    def read_buffer_size(self) -> int:
        return self.session.buffered

    # --- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        assert self.transport is not None
        broker = self.broker
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            host = self.peer_host = peername[0]
            self.peer = f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
        self.session.peer = self.peer
        broker.connections.add(self)
        broker.unauthenticated += 1  # given back by left_pre_auth, exactly once
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
        transport.write(encode_info(broker.name_bytes, self.session.nonce))
        self._auth_deadline = broker.loop.call_later(limits.auth_timeout_s, self._on_auth_timeout)

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        session = self.session
        try:
            if session.receive(data):
                self._yield_turn()
            elif session.state == AUTHING and session.buffered > self._authing_buffer_cap():
                # Reading is paused during a lookup; a transport may still hand over what it had.
                metrics.LIMIT_REJECTIONS.labels("pre_auth_buffer").inc()
                self.close(CloseReason.FRAME_TOO_LARGE, "too much data before authentication completed")
        except Exception:
            self._internal_error("handling received data")

    def _authing_buffer_cap(self) -> int:
        return self.broker.frame_limits.max_publish_frame_bytes + _AUTHING_BUFFER_MARGIN

    def eof_received(self) -> bool:
        # Half-close: frames already received (AUTH + PUBLISH + FIN in one
        # segment) are still handled; the transport closes once they are done.
        if self.session.state == AUTHING or self._turn_pending:
            self._eof_pending = True
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        broker = self.broker
        session = self.session
        if session.state != CLOSED:
            try:
                session.close(CloseReason.CLIENT_CLOSED if exc is None else CloseReason.CONNECTION_RESET, None)
            except Exception:
                log.exception("internal error while closing %s", self.peer)
        self._cancel_timers()
        if self in broker.connections:
            broker.connections.discard(self)
            broker.retire(self)
            if session.ident is not None:
                broker.by_ident_discard(self)
        # Break the protocol <-> transport cycle so a closed connection is freed
        # by reference counting, not by a later (long) cyclic GC pass.
        self.transport = None
        ident = session.ident or ""
        reason = session.close_reason or CloseReason.CONNECTION_RESET
        metrics.CONNECTION_LOST.labels(ident).inc()
        metrics.CONNECTIONS_CLOSED.labels(reason.value).inc()
        log.info(
            "closed %s%s: %s",
            self.peer,
            f" ({ident})" if ident else "",
            reason.value,
            extra={"event": "closed", "peer": self.peer, "ident": session.ident, "reason": reason.value},
        )

    def pause_writing(self) -> None:
        # The subscriber's queue passed the backlog mark: watch its progress.
        if self._backlog_timer is None and self.session.state != CLOSED:
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

    def delivery_failed(self) -> None:
        """``deliver`` raised during a fan-out: close this subscriber alone."""
        self._internal_error("delivering to this subscriber")

    # --- the session's actions -------------------------------------------------------

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def publish(self, channel: bytes, data: bytes, frames: int) -> int:
        return self.broker.router.publish(channel, data, frames)

    def subscribe(self, channel: bytes) -> None:
        self.broker.router.subscribe(channel, self)

    def unsubscribe(self, channel: bytes) -> None:
        self.broker.router.unsubscribe(channel, self)

    def left_pre_auth(self) -> None:
        self.broker.unauthenticated -= 1

    def lookup(self, ident: str) -> None:
        """The key at once when the store can answer without waiting (sqlite,
        env, JSON); otherwise pause reading and finish in a task (PostgreSQL, a
        locked sqlite). Either way, pipelined frames wait in the session."""
        broker = self.broker
        if self._rate_limited(ident):
            return  # refused without a lookup or a verification: guessing costs nothing
        try:
            key = broker.lookup_now(ident)
        except WouldBlock:
            assert self.transport is not None
            self.transport.pause_reading()
            broker.spawn(self._lookup_later(ident))
            return
        except AuthUnavailable as e:
            self.session.key_unavailable(str(e))
            return
        if self.session.key_found(key):
            self._yield_turn()

    async def _lookup_later(self, ident: str) -> None:
        try:
            try:
                key = await self.broker.lookup(ident)
            except AuthUnavailable as e:
                self.session.key_unavailable(str(e))
                return
            if self.session.state != AUTHING or self._rate_limited(ident):
                return  # closed meanwhile, or blocked by failures that finished while we looked
            if self.session.key_found(key):
                self._yield_turn()
            else:
                self._resume_reading()
        except Exception:
            self._internal_error("finishing AUTH")

    def _rate_limited(self, ident: str) -> bool:
        """Refuse (and return True) when this address, or this address and ident, is blocked."""
        broker = self.broker
        limiter = broker.auth_limiter
        if not limiter.enabled or not limiter.blocked(self.peer_host, ident, broker.loop.time()):
            return False
        self.session.rate_limited(limiter.limits.block_s)
        return True

    def auth_failed(self, ident: str) -> None:
        broker = self.broker
        limiter = broker.auth_limiter
        if not limiter.enabled:
            return
        block = limiter.record_failure(self.peer_host, ident, broker.loop.time())
        if block is not None:
            log.warning(
                "refusing for %g s: %s",
                limiter.limits.block_s,
                block,
                extra={"event": "auth_blocked", "peer": self.peer, "reason": "auth_rate_limited"},
            )

    def authenticated(self, key: AccessKey) -> None:
        broker = self.broker
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None
        self.apply_key(key)
        broker.by_ident_add(self)
        metrics.CONNECTION_READY.labels(key.ident).inc()
        log.info(
            "%s authenticated as %s",
            self.peer,
            key.ident,
            extra={"event": "authenticated", "peer": self.peer, "ident": key.ident},
        )

    def apply_key(self, key: AccessKey) -> set[bytes]:
        """Take the key's channels; returns the subscriptions they no longer allow (now dropped).

        The channel sets are shared across the connections of one key: 10,000
        sensors with the same 50 channels hold one set, not 10,000.
        """
        broker = self.broker
        return self.session.set_channels(broker.channel_set(key.pubchans), broker.channel_set(key.subchans))

    def close_transport(self, reason: CloseReason, error: bytes | None, abort: bool) -> None:
        self._cancel_timers()
        transport = self.transport
        if self._lost or transport is None:
            return
        if abort:
            transport.abort()
            return
        if error is not None:
            transport.write(error)
        transport.close()
        if transport.get_write_buffer_size():
            # A peer that does not read must not keep the socket forever.
            self.broker.loop.call_later(CLOSE_FLUSH_S, transport.abort)

    # --- turns ---------------------------------------------------------------------------

    def _yield_turn(self) -> None:
        """More work than one loop turn should do: finish it in a later turn."""
        if self._turn_pending:
            return
        self._turn_pending = True
        assert self.transport is not None
        self.transport.pause_reading()
        self.broker.loop.call_soon(self._continue_turn)

    def _continue_turn(self) -> None:
        self._turn_pending = False
        try:
            if self.session.state != READY:
                return
            if self.session.resume():
                self._yield_turn()
            else:
                self._resume_reading()
        except Exception:
            self._internal_error("handling received data")

    def _resume_reading(self) -> None:
        transport = self.transport
        if self.session.state != READY or self._turn_pending or transport is None or transport.is_closing():
            return
        if self._eof_pending:
            transport.close()  # the FIN that came behind the frames, now that every one is handled
        elif self.broker.state != "stopping":
            transport.resume_reading()

    # --- timers ------------------------------------------------------------------------------

    def _on_auth_timeout(self) -> None:
        self._auth_deadline = None
        try:
            self.session.auth_timeout(self.broker.config.limits.auth_timeout_s)
        except Exception:
            self._internal_error("enforcing the AUTH deadline")

    def _watch_backlog(self) -> None:
        """Runs every BACKLOG_CHECK_S while the subscriber is backlogged."""
        self._backlog_timer = None
        if self.session.state == CLOSED or self.transport is None or self.transport.is_closing():
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
        self.session.close(reason, message, abort=abort)

    def _internal_error(self, where: str) -> None:
        """The boundary: a bug while handling this connection closes it alone."""
        log.exception(
            "internal error while %s for %s (%s); closing this connection",
            where,
            self.peer,
            self.session.ident,
            extra={"event": "internal_error", "peer": self.peer, "ident": self.session.ident},
        )
        try:
            self.session.close(CloseReason.INTERNAL_ERROR, "internal error; this connection is closed")
        except Exception:
            log.exception("internal error while closing %s", self.peer)
            if self.session.close_reason is None:
                self.session.close_reason = CloseReason.INTERNAL_ERROR
            if self.transport is not None:
                self.transport.abort()

    def _cancel_timers(self) -> None:
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
            self._backlog_timer = None
