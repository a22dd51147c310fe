"""A subscriber's outgoing backlog, watched: ``BacklogWatch`` and ``cut_slow_consumer``.

A subscriber that cannot keep up is cut (``slow_consumer``) before it costs
memory or slows anyone else. Made at the first ``pause_writing`` (the
transport's buffer passed its high-water mark), dropped at ``resume_writing``,
so a subscriber that keeps up never has one. Every ``BACKLOG_CHECK_S`` it asks
``policies.SlowConsumerWatch`` (hard and soft bounds, stall timeout) with
``loop.time()``; the timer is the connection's (``_call_later``: inside its
guarded boundary). The hard bound does not depend on this timer: the
connection checks it at every delivery while the transport reports a backlog
(``Connection.deliver``), whatever the timer does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import metrics
from .events import SlowConsumerCut
from .policies import SlowConsumerWatch
from .reasons import CloseReason
from .session import CLOSED
from .tuning import BACKLOG_CHECK_S

if TYPE_CHECKING:
    import asyncio

    from .connection import Connection


class BacklogWatch:
    __slots__ = ("_conn", "_timer", "_watch")

    def __init__(self, conn: Connection) -> None:
        broker = conn.broker
        self._conn = conn
        self._timer: asyncio.TimerHandle | None = None
        self._watch = SlowConsumerWatch(
            broker.backlog_bounds, broker.loop.time(), conn.write_buffer_size(), conn.sent_bytes
        )
        metrics.SEND_BUFFER_DEADLINE_START.labels(conn.session.ident or "").inc()
        self._timer = conn._call_later(BACKLOG_CHECK_S, self._check)

    def closeness(self) -> float:
        """How near the cut, 0 to 1 (``SlowConsumerWatch.closeness``; the console reads it)."""
        conn = self._conn
        return self._watch.closeness(conn.broker.loop.time(), conn.write_buffer_size())

    def stop(self) -> None:
        """The connection closes: no more checks."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def recovered(self) -> None:
        """The backlog cleared (``resume_writing``): no more checks, the recovery counted."""
        if self._timer is not None:
            self.stop()
            metrics.SEND_BUFFER_DEADLINE_RECOVER.labels(self._conn.session.ident or "").inc()

    def _check(self) -> None:
        """Runs every BACKLOG_CHECK_S while the subscriber is backlogged."""
        self._timer = None
        conn = self._conn
        transport = conn.transport
        if conn.session.state == CLOSED or transport is None or transport.is_closing():
            return
        why = self._watch.check(conn.broker.loop.time(), transport.get_write_buffer_size(), conn.sent_bytes)
        if why is not None:
            cut_slow_consumer(conn, why)
        else:
            self._timer = conn._call_later(BACKLOG_CHECK_S, self._check)


def cut_slow_consumer(conn: Connection, why: str) -> None:
    """Close ``conn``, a subscriber that cannot keep up (``why``), at once."""
    if conn.session.state == CLOSED:
        return
    metrics.SLOW_CONSUMERS.inc()
    conn.broker.emit(SlowConsumerCut(conn.peer, conn.session.ident, why, conn.write_buffer_size()))
    # Its queue is stuck, so an ERROR behind it would never arrive: abort.
    conn.close(CloseReason.SLOW_CONSUMER, None, abort=True)
