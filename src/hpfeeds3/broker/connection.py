"""Connection: the ``asyncio.Protocol`` around one client's ``Session``.

The session (``session.py``) decides everything about the client's frames;
this class is its ``Output`` (``send``, ``close_transport``) and moves bytes:
it owns the transport, the timers and the turns (when one read holds more
work than one loop turn should do, reading is paused and the rest is handled
in later turns, in order). The broker side of the session is ``Broker`` (its
``Port``); clock-driven decisions are ``policies.py`` objects fed
``loop.time()``; what happens is reported as typed events (``Broker.emit``).

Every entry point runs inside one internal-error boundary (``boundary.py``
states the rule), and a lost connection points at nothing (``lost.py``). The
parts with a job of their own live beside the job, made only for the
connections (or the moments) that need them; each module states its rules:
``tls.TlsPump`` (a TLS listener's connection), ``keylookup`` (the session's
``NeedKey``), ``partial.PartialFrameWatch`` (a read ends inside a frame),
``backlog.BacklogWatch`` (the transport reports a backlog; the hard bound is
checked in ``deliver``), ``linger.LingeringClose`` (after a closing ERROR),
``heldback.HeldBack`` (held back from the pre-auth pool) and
``durable.feed.ConnectionFeed`` (a durable key's connection).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import new_nonce
from . import metrics
from .admission import Groups, address_groups
from .backlog import BacklogWatch, cut_slow_consumer
from .boundary import Guarded, guarded
from .durable.feed import ConnectionFeed, DurableFeed
from .durable.tcpack import CloseKind, close_kind
from .events import Closed, Connected
from .heldback import HeldBack
from .keylookup import answer as answer_key
from .linger import LingeringClose
from .lost import DETACHED, write_after_close
from .metrics import Limit
from .partial import PartialFrameWatch
from .partial import release as release_partial
from .partial import watch as watch_partial
from .reasons import CloseReason
from .session import AUTHING, CLOSED, PRE_AUTH, READY, Session
from .tls import TlsPump
from .tuning import BACKLOG_HIGH_BYTES, BACKLOG_LOW_BYTES, CHECKED_FRAMES_PER_TURN, CLOSE_FLUSH_S

if TYPE_CHECKING:
    from .state import Broker

log = logging.getLogger("hpfeeds3.broker.connection")

# Bytes a client may send behind its AUTH while the key store is asked:
# one largest frame and a margin (reading is paused meanwhile).
_AUTHING_BUFFER_MARGIN = 65536
# Closed for what other connections did, not for their own bytes: no linger.
_CLOSED_FOR_ROOM = frozenset({CloseReason.TOO_MANY_CONNECTIONS, CloseReason.TOO_MANY_UNAUTHENTICATED})


def _write_unconnected(data: bytes) -> None:  # pragma: no cover - never called before connection_made
    raise RuntimeError("write before the connection was made")


class Connection(Guarded, asyncio.Protocol):
    __slots__ = (
        "_backlogged",
        "_durable",
        "_eof_pending",
        "_held",
        "_linger",
        "_lost",
        "_partial",
        "_peer_fin",
        "_tls",
        "_tls_pump",
        "_turn_pending",
        "_write",
        "backlog_watch",
        "broker",
        "connected_at",
        "feed",
        "group",
        "id",
        "peer",
        "peer_host",
        "received_bytes",
        "sent_bytes",
        "session",
        "transport",
    )

    def __init__(self, broker: Broker, tls: ssl.SSLContext | None = None) -> None:
        self.broker = broker
        self.id = broker.next_connection_id()  # never reused in this process
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_host = "?"
        self._tls = tls
        self._tls_pump: TlsPump | None = None  # from start() on a TLS listener
        # A plain function, not a bound method: one object less per connection, and no
        # connection -> method -> connection cycle (connection_made replaces it).
        self._write: Callable[[bytes], None] = _write_unconnected
        self.group: Groups = ("?", "?")  # (network, address) for the pre-auth pool (admission.py)
        limits = broker.config.limits
        self.session: Session[Connection] = Session(
            self,
            broker,
            new_nonce(),
            broker.frame_limits,
            max_subscriptions=limits.max_subscriptions,
            max_denials=limits.max_denials,
            budget=CHECKED_FRAMES_PER_TURN,
        )
        self.received_bytes = 0
        self.sent_bytes = 0
        self.connected_at = 0.0  # wall clock of the accept (the console shows it)
        self._lost = False
        self._linger: LingeringClose | None = None  # after a closing ERROR (linger.py)
        self._partial: PartialFrameWatch | None = None  # while a read ends inside a frame
        self._eof_pending = False
        self._held: HeldBack | None = None  # while held back (heldback.py)
        self._turn_pending = False
        self._backlogged = False  # the transport is over its high-water mark
        self.backlog_watch: BacklogWatch | None = None  # while backlogged (backlog.py)
        # A durable key's connection: its channels come from the log (durable/feed.py).
        self.feed: DurableFeed | None = None
        self._durable: ConnectionFeed | None = None  # its acknowledgements and its end
        self._peer_fin = False  # the client ended with FIN (or close_notify)

    # --- what the rest of the broker reads (the session holds the client's state) -------

    @property
    def tls(self) -> bool:
        """The client speaks TLS (terminated in this connection)."""
        return self._tls is not None

    def write_buffer_size(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    # --- asyncio.Protocol ----------------------------------------------------

    @guarded("accepting the connection")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        assert self.transport is not None
        self.connected_at = time.time()
        self._write = self.transport.write
        broker = self.broker
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            host = self.peer_host = peername[0]
            self.peer = f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
            self.group = address_groups(host)
        self.session.peer = self.peer
        metrics.CONNECTION_MADE.inc()
        broker.emit(Connected(self.peer, self.id))
        # Counted, and in the pre-auth pool until it leaves it, exactly once; the
        # broker calls start() now, or once a slot frees (held back meanwhile).
        broker.admit(self)

    def hold_back(self) -> None:
        """The pre-auth pool is full of connections making progress: wait, unread (heldback.py)."""
        assert self.transport is not None
        self._held = HeldBack(self.transport)

    def start(self, held: bool = False) -> None:
        """Admitted to the pre-auth pool: the TLS handshake, or INFO."""
        assert self.transport is not None
        broker = self.broker
        if self._tls is not None:
            # The handshake runs in this connection (tls.py), on its own deadline.
            pump = self._tls_pump = TlsPump(self, self._tls, broker.config.limits.max_tls_records_without_data)
            self._write = pump.write
            broker.tls_deadlines.add(self)
        else:
            self._greet()
        if held:
            holding, self._held = self._held, None
            self.transport.resume_reading()
            if holding is not None and holding.data:
                self.data_received(holding.data)

    def _greet(self) -> None:
        """INFO with the nonce, and the AUTH deadline from now."""
        assert self.transport is not None
        broker = self.broker
        if self._tls is not None:
            broker.tls_deadlines.discard(self)  # handshake done
        self.transport.set_write_buffer_limits(high=BACKLOG_HIGH_BYTES, low=BACKLOG_LOW_BYTES)
        self._write(broker.info_head + self.session.nonce)
        broker.auth_deadlines.add(self)

    @guarded("handling received data")
    def data_received(self, data: bytes) -> None:
        session = self.session
        if session.state == CLOSED:
            # Lingering after an ERROR: read and discard, a bounded amount.
            linger = self._linger
            if (linger is None or not linger.read(len(data))) and self.transport is not None:
                self.transport.abort()
            return
        tls = self._tls_pump
        if session.state != READY:
            if self._held is not None:
                self._held.hold(self, data)
                return
            if tls is None:
                self._received_plain(data)
                # Bytes of an AUTH not finished yet: not evicted for a while. (Marked after:
                # an AUTH handled in this read has left the pool, and nothing in between evicts.)
                if session.state == PRE_AUTH or session.state == AUTHING:
                    self.broker.progress(self)
                return
            self.broker.progress(self)  # bytes of a TLS handshake (or of an AUTH inside it)
        if tls is not None:
            tls.receive(data)
            return
        self._received_plain(data)

    def _received_plain(self, data: bytes) -> None:
        """The client's bytes (decrypted under TLS) into the session."""
        session = self.session
        if session.state == CLOSED:
            return
        self.received_bytes += len(data)
        work = session.receive(data)
        if work is True:
            self._yield_turn()
        elif work is not False:
            answer_key(self, work)
        if session.state == AUTHING and session.buffered > self._authing_buffer_cap():
            # Reading is paused during a lookup; a transport may still hand over what it had.
            metrics.limit_rejected(Limit.PRE_AUTH_BUFFER)
            self.close(CloseReason.FRAME_TOO_LARGE, "too much data before authentication completed")
        if session.pending_frame_bytes or self._partial is not None:
            watch_partial(self)

    def _authing_buffer_cap(self) -> int:
        return self.broker.frame_limits.max_publish_frame_bytes + _AUTHING_BUFFER_MARGIN

    @guarded("handling the client's EOF")
    def eof_received(self) -> bool:
        # Half-close: frames already received (AUTH + PUBLISH + FIN in one
        # segment) are still handled; the transport closes once they are done.
        self._peer_fin = True
        if self._linger is not None:
            return False  # the client read our ERROR and closed: done
        tls = self._tls_pump
        if self.session.state == AUTHING or self._turn_pending or (tls is not None and tls.session.backlogged):
            self._eof_pending = True
            return True
        return False

    @guarded("closing the connection")
    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        broker = self.broker
        session = self.session
        if self.feed is not None:
            # The last sample, while the socket is still readable: exact after the
            # client's FIN, less the overlap after a reset or a close by the broker.
            self.feed_finish(
                close_kind(peer_fin=self._peer_fin, reset=exc is not None, closed_by_broker=session.state == CLOSED)
            )
        if session.state != CLOSED:
            try:
                session.close(CloseReason.CLIENT_CLOSED if exc is None else CloseReason.CONNECTION_RESET, None)
            except Exception:
                log.exception("internal error while closing %s", self.peer)
        self._cancel_timers()
        release_partial(self)
        broker.forget(self)
        # Every cycle through this connection broken: freed by reference counting (lost.py).
        self.transport = None
        self._write = write_after_close
        session.output = DETACHED  # type: ignore[assignment]
        self._tls_pump = self._durable = self.feed = self.backlog_watch = self._linger = None
        ident = session.ident or ""
        reason = session.close_reason or CloseReason.CONNECTION_RESET
        metrics.CONNECTION_LOST.inc(ident)
        metrics.CONNECTIONS_CLOSED.inc(reason._value_)  # (.value: a Python-level property)
        broker.emit(Closed(self.peer, self.id, session.ident, reason, session.publish_stats))

    @guarded("watching the outgoing buffer")
    def pause_writing(self) -> None:
        # The subscriber's queue passed the backlog mark: watch its progress (backlog.py).
        # The flag first: the hard bound is checked at every delivery from now on,
        # whatever happens to the watch.
        self._backlogged = True
        if self.backlog_watch is None and self.session.state != CLOSED:
            self.backlog_watch = BacklogWatch(self)

    @guarded("watching the outgoing buffer")
    def resume_writing(self) -> None:
        self._backlogged = False
        watch = self.backlog_watch
        if watch is not None:
            self.backlog_watch = None
            watch.recovered()
        if self.feed is not None:
            self.feed.pump_soon()

    # --- the router's side ------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self._write(data)
        self.sent_bytes += len(data)
        if self._backlogged and transport.get_write_buffer_size() > self.broker.send_hard_bytes:
            cut_slow_consumer(self, "outgoing buffer over its hard bound")

    def delivery_failed(self) -> None:
        """``deliver`` raised during a fan-out: close this subscriber alone."""
        self.internal_error("delivering to this subscriber")

    # --- a durable key's feed (durable/feed.py) --------------------------------------

    def feed_pump(self) -> None:
        """New messages in the log (the broker's call): send what this connection may."""
        if self._durable is not None:
            self._durable.pump()

    def feed_finish(self, kind: CloseKind) -> None:
        """Commit this connection's positions and stop its feed (the broker's call, and at close). Once."""
        if self._durable is not None:
            self._durable.finish(kind)

    # --- the session's output -----------------------------------------------------------

    def send(self, data: bytes) -> None:
        self._write(data)

    def close_transport(self, reason: CloseReason, error: bytes | None, abort: bool) -> None:
        self._cancel_timers()
        release_partial(self)
        transport = self.transport
        if self._lost or transport is None:
            return
        pump = self._tls_pump
        if (pump is not None and not pump.closing()) or abort or transport.is_closing():
            transport.abort()  # (before a TLS handshake completes there is no way to send an ERROR)
            return
        if error is None or reason in _CLOSED_FOR_ROOM:
            # Closed to make room (connection or pre-auth limits): the ERROR, then
            # the descriptor is given back at once — a linger here would let a
            # flood hold descriptors past the limit it is being closed for.
            if error is not None:
                self._write(error)
            transport.close()
            if transport.get_write_buffer_size():
                # A peer that does not read must not keep the socket forever.
                self._call_later(CLOSE_FLUSH_S, transport.abort)
            return
        # The ERROR, then the sending side shut down (plain TCP), then linger (linger.py):
        # what the client still sends is read and discarded, so closing does
        # not reset the connection before it has read the ERROR.
        self._write(error)
        if pump is not None:
            pump.close_notify()
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = LingeringClose(self, transport)

    # --- turns ---------------------------------------------------------------------------

    def _yield_turn(self) -> None:
        """More work than one loop turn should do: finish it in a later turn."""
        if self._turn_pending:
            return
        self._turn_pending = True
        assert self.transport is not None
        self.transport.pause_reading()
        self._call_soon(self._continue_turn)

    def _continue_turn(self) -> None:
        self._turn_pending = False
        if self.session.state != READY:
            return
        if self.session.resume() is True:
            self._yield_turn()
        else:
            self._resume_reading()

    def _resume_reading(self) -> None:
        transport = self.transport
        state = self.session.state
        if (state != READY and state != PRE_AUTH) or self._turn_pending or transport is None or transport.is_closing():
            return
        tls = self._tls_pump
        if tls is not None and tls.session.backlogged:
            tls.schedule()  # encrypted bytes first: decrypted in a later turn
            return
        if self._eof_pending:
            transport.close()  # the FIN that came behind the frames, now that every one is handled
        elif self.broker.state != "stopping":
            transport.resume_reading()

    # --- timers ------------------------------------------------------------------------------

    def _on_auth_timeout(self) -> None:
        """The AUTH deadline passed (broker.auth_deadlines, inside the boundary)."""
        self.session.auth_timeout(self.broker.config.limits.auth_timeout_s)

    def _on_tls_handshake_timeout(self) -> None:
        """The TLS handshake's deadline passed (broker.tls_deadlines, inside the boundary)."""
        if self._tls_pump is not None:
            self._tls_pump.handshake_timeout()

    # --- closing ---------------------------------------------------------------------------------

    def close(self, reason: CloseReason, message: str | None, *, abort: bool = False) -> None:
        """Close with a recorded reason; ``message`` goes out in an ERROR frame first."""
        self.session.close(reason, message, abort=abort)

    def _cancel_timers(self) -> None:
        broker = self.broker
        broker.auth_deadlines.discard(self)
        if self._tls is not None:
            broker.tls_deadlines.discard(self)
        if self.backlog_watch is not None:
            self.backlog_watch.stop()
