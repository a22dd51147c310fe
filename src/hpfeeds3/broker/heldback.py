"""A connection held back from the pre-auth pool: ``HeldBack``.

While the pool is full of connections making progress (admission.py), the
broker holds a newcomer back (``Broker.admit``): it reads nothing and sends
nothing until the broker starts it, as it would wait in the listen backlog.
A loop may hand over bytes after ``connection_made`` whatever it was told:
they are kept for ``Connection.start``, a bounded amount (one largest frame
and a margin; past it the connection is closed, ``pre_auth_buffer``). Made
only for a connection held back, dropped when it starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import metrics
from .metrics import Limit
from .reasons import CloseReason

if TYPE_CHECKING:
    import asyncio

    from .connection import Connection


class HeldBack:
    __slots__ = ("data",)

    def __init__(self, transport: asyncio.Transport) -> None:
        self.data = b""  # read while held back, handled at start
        transport.pause_reading()

    def hold(self, conn: Connection, data: bytes) -> None:
        """Bytes read while held back: kept, reading paused again."""
        assert conn.transport is not None
        self.data += data
        conn.transport.pause_reading()
        if len(self.data) > conn._authing_buffer_cap():
            metrics.limit_rejected(Limit.PRE_AUTH_BUFFER)
            conn.close(CloseReason.FRAME_TOO_LARGE, "too much data before authentication completed", abort=True)
