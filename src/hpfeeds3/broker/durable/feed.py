"""A durable key's connection: its channels fed from the log, replay then live.

A connection whose key is durable is not a subscriber of the router: each
channel it subscribes is read from the channel's log, from the key's
position, by a ``BacklogReader``; what the log has not written yet reaches it
once written: when the router, between publishes, sees that the writer wrote
more (the log's ``written_batches``), or the writer's ``on_written`` reaches
the loop. A feed that had caught up is then sent all that was written at once
(``written``); one still behind goes on a turn at a time. So the backlog and
the live messages are one ordered stream per channel: no gap, no reordering.

Paced by the transport: ``pump`` writes while the transport is under its
high-water mark and stops at ``pause_writing``; ``resume_writing`` pumps
again. A turn writes at most ``PUMP_BYTES`` more than the log took in since the
feed's last turn (the rest in a later turn): a feed keeps pace with the
publishers, as a plain subscriber gets every publish of the turn, and catches
up on a backlog ``PUMP_BYTES`` a turn, fair to every other connection. Each
chunk is at most ``CHUNK_BYTES``: memory per durable connection is the
transport's high-water mark, one chunk and the reader's block, whatever the
backlog.

Positions follow TCP acknowledgements (``tcpack.AckTracker``): every write
after the feed starts is counted, sampled every ``SAMPLE_S`` (committed with
the overlap: the process may die with no chance to look again) and at close
(exact after a clean FIN, with the overlap otherwise).

``ConnectionFeed`` is a durable key's connection as its feed sees it, made
at AUTH for that connection alone: its ``FeedOutput`` (every write of the
connection counted from then on, ``write_counted``), the timer that samples
its acknowledgements (through the connection's guarded ``_call_later``) and
the end that commits its positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..session import CLOSED, READY
from .base import BacklogReader, DurableLog
from .format import RECORD_MAX_BYTES
from .tcpack import AckTracker, CloseKind, SocketLike, tcp_bytes_acked, unacked_in_kernel

if TYPE_CHECKING:
    from ..connection import Connection

log = logging.getLogger("hpfeeds3.broker.durable")

# One read from the log (a whole record: a chunk ends at a record boundary rather
# than walk the frames of a record to fill it), and the bytes written to a
# connection per loop turn.
CHUNK_BYTES = RECORD_MAX_BYTES
PUMP_BYTES = 256 * 1024
# How often a live durable connection's acknowledgements are sampled and committed.
SAMPLE_S = 0.1


class FeedOutput(Protocol):
    """What a feed needs of its connection."""

    def feed_write(self, data: bytes | memoryview) -> int:
        """Write ``data``; returns the bytes that went on the wire (ciphertext under TLS)."""
        ...

    def feed_writelines(self, pieces: tuple[bytes | memoryview, ...], size: int) -> int:
        """Write ``pieces`` (``size`` bytes in all) one after the other, as ``feed_write``."""
        ...

    def feed_writable(self) -> bool:
        """The transport is open and under its high-water mark."""
        ...

    def feed_socket(self) -> SocketLike | None: ...

    def feed_buffered(self) -> int:
        """Bytes in the transport's own buffer (not yet in the kernel)."""
        ...


class ConnectionFeed:
    """A durable key's connection as its feed sees it (``attach``)."""

    __slots__ = ("_conn", "_sample_timer", "feed")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._sample_timer: asyncio.TimerHandle | None = None
        self.feed: DurableFeed | None = None

    @classmethod
    def attach(cls, conn: Connection, ident: str) -> ConnectionFeed | None:
        """``conn`` authenticated with durable key ``ident``: its feed from now on (None
        without a durable log)."""
        self = cls(conn)
        feed = conn.broker.durable_attach(conn, ident, self, conn._call_soon)
        if feed is None:
            return None
        self.feed = conn.feed = feed
        conn._write = self.write_counted  # every byte from now on counts (tcpack)
        self._sample_timer = conn._call_later(SAMPLE_S, self._sample_acks)
        return self

    def pump(self) -> None:
        """New messages in the log: send what this connection may (``DurableFeed.written``)."""
        feed = self.feed
        if feed is not None:
            try:
                feed.written()
            except Exception:
                self._conn.internal_error("feeding a durable connection")

    def finish(self, kind: CloseKind) -> None:
        """Commit this connection's positions (``kind``: how it ended) and stop its feed. Once."""
        feed = self.feed
        if feed is None or feed.finished:
            return
        if self._sample_timer is not None:
            self._sample_timer.cancel()
            self._sample_timer = None
        try:
            feed.finish(kind)
        finally:
            self.feed = None  # the feed points back here (its output): no cycle left
            self._conn.broker.durable_detach(self._conn, feed.ident)

    def _sample_acks(self) -> None:
        self._sample_timer = None
        feed = self.feed
        if feed is None or feed.finished or self._conn.session.state == CLOSED:
            return
        feed.sample()
        self._sample_timer = self._conn._call_later(SAMPLE_S, self._sample_acks)

    def feed_write(self, data: bytes | memoryview) -> int:
        conn = self._conn
        assert conn.transport is not None
        conn.sent_bytes += len(data)
        tls = conn._tls_pump
        if tls is None:
            conn.transport.write(data)
            return len(data)
        wire = tls.session.encrypt(data)
        conn.transport.write(wire)
        return len(wire)

    def feed_writelines(self, pieces: tuple[bytes | memoryview, ...], size: int) -> int:
        conn = self._conn
        if len(pieces) == 1 or conn._tls_pump is not None:
            return self.feed_write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        assert conn.transport is not None
        conn.sent_bytes += size
        conn.transport.writelines(pieces)  # one writev, the pieces not joined
        return size

    def write_counted(self, data: bytes) -> None:
        """The connection's own writes (its ``_write`` once the feed starts): counted, not deliveries."""
        conn = self._conn
        wire = self.feed_write(data)
        conn.sent_bytes -= len(data)  # not a delivery
        if conn.feed is not None:
            conn.feed.tracker.wrote(len(data), wire_bytes=wire)

    def feed_writable(self) -> bool:
        conn = self._conn
        t = conn.transport
        return t is not None and not conn._backlogged and not t.is_closing() and conn.session.state == READY

    def feed_socket(self) -> SocketLike | None:
        t = self._conn.transport
        return None if t is None else t.get_extra_info("socket")

    def feed_buffered(self) -> int:
        t = self._conn.transport
        return 0 if t is None else t.get_write_buffer_size()


class FeedStats:
    """Per durable ident, kept by the broker across connections (metrics)."""

    __slots__ = ("duplicates", "replayed")

    def __init__(self) -> None:
        self.replayed = 0  # messages sent from the log (backlog and live)
        self.duplicates = 0  # of those, sent again after an abortive close (the overlap)


class DurableFeed:
    def __init__(
        self,
        ident: str,
        durable: DurableLog,
        output: FeedOutput,
        overlap_bytes: int,
        stats: FeedStats,
        exact: dict[bytes, int],
        schedule: Callable[[Callable[[], object]], None],
    ) -> None:
        self.ident = ident
        self.log = durable
        self.output = output
        self.stats = stats
        # Per channel: the position proven exactly at the last abortive close; what is
        # sent again below it is an overlap duplicate.
        self._exact = exact
        self._schedule = schedule
        self._readers: dict[bytes, BacklogReader] = {}
        self.finished = False
        self._pump_pending = False
        # Its last pump sent everything written (not stopped by its budget or the
        # transport): what the writer writes next is sent as soon as the loop learns of it.
        self.live = False
        self._inflow_seen = durable.appended_bytes  # the log's inflow at the last turn
        self.tracker = AckTracker(overlap_bytes)
        # Offsets count from the kernel's view of this stream so far (INFO, the TLS
        # handshake): acknowledged, not yet acknowledged, and still in the transport.
        sock = output.feed_socket()
        sent = 0
        if sock is not None:
            acked = tcp_bytes_acked(sock)
            outq = unacked_in_kernel(sock)
            sent = (acked or 0) + (outq or 0)
        sent += output.feed_buffered()
        self.tracker.plain_written = self.tracker.wire_written = sent
        self.tracker.acked_plain = 0

    @property
    def channels(self) -> tuple[bytes, ...]:
        return tuple(self._readers)

    def add(self, channel: bytes) -> None:
        """Follow ``channel`` for this key (from now, the first time) and replay from its position."""
        if channel in self._readers or self.finished:
            return
        start = self.log.follow(self.ident, channel)
        self.tracker.start(channel, start)
        self._readers[channel] = self.log.open_reader(channel, start)
        self.pump_soon()

    def remove(self, channel: bytes) -> None:
        """UNSUBSCRIBE: stop sending ``channel``; its position stays (the key still follows it)."""
        reader = self._readers.pop(channel, None)
        if reader is not None:
            reader.close()

    def pump_soon(self) -> None:
        if not self._pump_pending and not self.finished:
            self._pump_pending = True
            self._schedule(self._pump_turn)

    def _pump_turn(self) -> None:
        self._pump_pending = False
        if self.pump():
            self.pump_soon()

    def written(self) -> None:
        """The log's writer wrote more. A feed that had caught up is sent it now, whole:
        it is what came in since (the loop learns of it between publishes, and a turn
        can be long); a feed still behind goes on a turn at a time (``pump``)."""
        if not self.live or self.pump(keep_pace=True):
            self.pump_soon()

    def pump(self, keep_pace: bool = False) -> bool:
        """Write what the log has for this connection while the transport takes it, at
        most ``PUMP_BYTES`` more than the log took in since the last pump (``keep_pace``:
        no bound, for a feed that had caught up); True when there is more and the
        transport would take it (a later turn)."""
        output = self.output
        # Under load a loop turn is long and many publishes come in it: a fixed budget
        # a turn would fall behind them.
        inflow = self.log.appended_bytes
        budget = PUMP_BYTES + inflow - self._inflow_seen if not keep_pace else 1 << 62
        self._inflow_seen = inflow
        self.live = False
        tracker = self.tracker
        stats = self.stats
        progress = True
        while progress and not self.finished:
            progress = False
            for channel, reader in list(self._readers.items()):
                if budget <= 0:
                    return output.feed_writable()
                if not output.feed_writable():
                    return False
                chunk = reader.read(CHUNK_BYTES)
                if chunk is None:
                    continue
                progress = True
                size = chunk.size
                wire = output.feed_writelines(chunk.pieces, size)
                tracker.wrote(size, wire_bytes=wire, channel=channel, position=chunk.end_seq)
                budget -= size
                stats.replayed += chunk.frames
                exact = self._exact.get(channel)
                if exact is not None:
                    if chunk.first_seq < exact:
                        stats.duplicates += min(chunk.end_seq, exact) - chunk.first_seq
                    if chunk.end_seq >= exact:
                        del self._exact[channel]
        self.live = True
        return False

    def sample(self) -> None:
        """Commit what the acknowledgements prove now, less the overlap (the process may die next)."""
        if self.finished:
            return
        self._sample()
        self._commit(self.tracker.positions(CloseKind.ABORTIVE))

    def finish(self, kind: CloseKind) -> None:
        """The connection ends (``kind``: how): a last sample, positions committed. Once."""
        if self.finished:
            return
        self._sample()
        self.finished = True
        positions = self.tracker.positions(kind)
        self._commit(positions)
        if kind is CloseKind.ABORTIVE:
            exact = self.tracker.positions(CloseKind.CLEAN)
            for channel, position in positions.items():
                if exact.get(channel, position) > position:
                    self._exact[channel] = exact[channel]
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _sample(self) -> None:
        sock = self.output.feed_socket()
        if sock is None:
            return
        with contextlib.suppress(OSError, ValueError):  # a socket already closed: keep what was proven
            self.tracker.sample(sock, self.output.feed_buffered())

    def _commit(self, positions: dict[bytes, int]) -> None:
        for channel, position in positions.items():
            self.log.commit(self.ident, channel, position)
