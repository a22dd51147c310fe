"""A close that lingers after its ERROR: ``LingeringClose``.

An ERROR that ends a connection is written and the sending side shut down
(``Connection.close_transport``); then what the client still sends is read
and discarded for ``CLOSE_LINGER_S``, ``CLOSE_LINGER_BYTES`` at most
(``policies.Linger``), before the close: a client that pipelines frames
behind a wrong AUTH still reads the ERROR instead of a reset. Made at such a
close alone (a connection closed to make room for others gives its
descriptor back at once). While it lingers the broker keeps it
(``Broker.lingering_add``): at the connection limit the oldest lingering
connection is cut first (``cut``). Its end is a timer of the connection
(``_call_later``: inside its guarded boundary).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from . import metrics
from .metrics import Limit
from .policies import Linger
from .tuning import CLOSE_LINGER_BYTES, CLOSE_LINGER_S

if TYPE_CHECKING:
    import asyncio

    from .connection import Connection


class LingeringClose:
    __slots__ = ("_conn", "_policy")

    def __init__(self, conn: Connection, transport: asyncio.Transport) -> None:
        """The ERROR is written and the sending side shut down: read what comes, for a while."""
        self._conn = conn
        self._policy = Linger(CLOSE_LINGER_BYTES)
        conn.broker.lingering_add(conn, self)
        with contextlib.suppress(RuntimeError, AttributeError):  # not paused, or a transport that cannot
            transport.resume_reading()
        conn._call_later(CLOSE_LINGER_S, self._end)

    def read(self, n: int) -> bool:
        """``n`` more bytes from the client, discarded; False once past the bound (abort)."""
        return self._policy.read(n)

    def cut(self) -> None:
        """The connection limit is reached and this is the oldest lingering connection: end it now."""
        conn = self._conn
        conn.broker.lingering_discard(conn)
        metrics.limit_rejected(Limit.MAX_CONNECTIONS)
        if conn.transport is not None and not conn._lost:
            conn.transport.abort()

    def _end(self) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is None or conn._lost:
            return
        if transport.get_write_buffer_size():
            transport.abort()  # the client never read its ERROR
        else:
            transport.close()
