"""A lost connection points at nothing: ``DETACHED`` and ``write_after_close``.

The rule: ``Connection.connection_lost`` breaks every cycle through the
connection (transport <-> protocol, including the transport's bound write;
session <-> connection; the parts that point back: TLS pump, durable feed,
backlog watch, linger), so a closed connection is freed by reference
counting, not by a later cyclic GC pass, whose full passes over 10,000 live
connections cost a reconnect storm more than its handshakes. What it points
at instead is here. ``tests/broker/test_freed.py`` checks it, whatever
closed the connection.
"""

from __future__ import annotations

from .reasons import CloseReason


def write_after_close(data: bytes) -> None:
    """What a connection writes once it is lost: nothing."""


class _Detached:
    """The session's output once its connection is lost: nothing happens (a closed
    session no longer acts, but must not point back at its connection)."""

    __slots__ = ()

    def send(self, data: bytes) -> None:
        pass

    def close_transport(self, reason: CloseReason, error: bytes | None, abort: bool) -> None:
        pass


DETACHED = _Detached()
