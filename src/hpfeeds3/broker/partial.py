"""The frame a connection is receiving, from its header on: ``PartialFrameWatch``.

Made when a read ends inside a frame, dropped when a read ends on a frame
boundary or the connection closes (``watch`` after such a read, ``release``
at the close), so a connection that receives whole frames never has one. A
frame whose header has arrived must arrive at ``--min-receive-rate``
(``policies.ReceiveRate``: a deadline per frame from the read that brought
its header, scaled to its size), else the connection is closed
(``slow_producer``); the bytes held for it are reported to the broker when
they change, which bounds their sum over all connections
(``Broker.hold_partial``). The deadline is a timer of the connection
(``_call_later``: inside its guarded boundary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import metrics
from .events import SlowProducer
from .metrics import Limit
from .reasons import CloseReason
from .session import CLOSED

if TYPE_CHECKING:
    import asyncio

    from .connection import Connection


class PartialFrameWatch:
    __slots__ = ("_conn", "_held", "_start", "_timer")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._start = -1  # stream offset of the frame being timed
        self._held = 0  # bytes reported to the broker
        self._timer: asyncio.TimerHandle | None = None

    def update(self) -> bool:
        """After a read: a new frame is timed, the bytes held reported. False (and
        released) once no frame is pending."""
        conn = self._conn
        session = conn.session
        pending = session.pending_frame_bytes
        if not pending or session.state == CLOSED:
            self.release()
            return False
        start = conn.received_bytes - session.buffered  # where the incomplete frame began in the stream
        if start != self._start:
            # A new frame: its own deadline, scaled to its size.
            if self._timer is not None:
                self._timer.cancel()
            self._start = start
            self._timer = conn._call_later(conn.broker.receive_rate.allowed_s(pending), self._expired)
        held = session.buffered
        if held != self._held:
            self._held = held
            conn.broker.hold_partial(conn, held)
        return True

    def release(self) -> None:
        """No frame pending any more (or the connection closes): no deadline, nothing held."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self._held = 0
            self._conn.broker.hold_partial(self._conn, 0)

    def _expired(self) -> None:
        self._timer = None
        conn = self._conn
        pending = conn.session.pending_frame_bytes
        rate = conn.broker.receive_rate
        metrics.limit_rejected(Limit.MIN_RECEIVE_RATE)
        conn.broker.emit(SlowProducer(conn.peer, conn.session.ident, rate.why(pending)))
        conn.close(CloseReason.SLOW_PRODUCER, rate.error(pending))


def watch(conn: Connection) -> None:
    """A read ended inside a frame, or one was being watched: make, update or drop the watch."""
    partial = conn._partial
    if partial is None:
        if conn.session.state == CLOSED:
            return
        partial = conn._partial = PartialFrameWatch(conn)
    if not partial.update():
        conn._partial = None


def release(conn: Connection) -> None:
    """The connection closes: its watch, if any, dropped."""
    partial = conn._partial
    if partial is not None:
        conn._partial = None
        partial.release()
