"""A connection's internal-error boundary: ``guarded`` and ``Guarded``.

The rule: every entry point of a connection and of its parts runs inside
this boundary, so a bug while handling one client closes that connection
alone (an ERROR to the client, the traceback in the log, ``internal_error``)
and never reaches the event loop or the other connections:

- asyncio's callbacks (``Connection``'s ``asyncio.Protocol`` methods) are
  decorated with ``guarded``;
- every timer of a connection and of its parts (``tls.TlsPump``,
  ``partial.PartialFrameWatch``, ``backlog.BacklogWatch``,
  ``linger.LingeringClose``, ``durable.feed.ConnectionFeed``, the turns) is
  scheduled through ``_call_later``/``_call_soon``, which run its target
  inside it;
- a task (``keylookup``), a failed delivery (``Router`` calls
  ``delivery_failed``) and the broker's per-connection loops (``recheck``,
  ``drain_and_close``, ``hold_partial``, eviction) catch and call
  ``internal_error`` themselves.

``tests/broker/test_guarded_boundary.py`` enumerates the modules holding a
connection's code and fails if a callback, a timer or a task is outside it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .reasons import CloseReason
from .session import CLOSED

if TYPE_CHECKING:
    import asyncio

    from .session import Session
    from .state import Broker

log = logging.getLogger("hpfeeds3.broker.connection")  # a connection's lines, wherever its code lives

_Method = TypeVar("_Method", bound=Callable[..., Any])


def guarded(where: str) -> Callable[[_Method], _Method]:
    """The boundary around an asyncio callback: an exception closes this connection
    alone with ``internal_error`` (logged with ``where``)."""

    def wrap(method: _Method) -> _Method:
        @functools.wraps(method)
        def guarded_method(self: Guarded, *args: Any) -> Any:
            try:
                return method(self, *args)
            except Exception:
                self.internal_error(where)
                return None

        guarded_method.__guarded__ = where  # type: ignore[attr-defined]
        return guarded_method  # type: ignore[return-value]

    return wrap


class Guarded:
    """The boundary's half of a connection (``Connection`` inherits it): its timers,
    and what an exception at an entry point does."""

    __slots__ = ()

    # Set by the connection.
    broker: Broker
    session: Session[Any]
    transport: asyncio.Transport | None
    peer: str

    def _call_later(self, delay: float, target: Callable[[], object]) -> asyncio.TimerHandle:
        """Every timer of a connection is scheduled here: its target runs inside the boundary.
        (Its TLS handshake and AUTH deadlines are the broker's, deadlines.py, and run their
        targets through ``_run_guarded`` too.)"""
        return self.broker.loop.call_later(delay, self._run_guarded, target)

    def _call_soon(self, target: Callable[[], object]) -> None:
        self.broker.loop.call_soon(self._run_guarded, target)

    def _run_guarded(self, target: Callable[[], object]) -> None:
        try:
            target()
        except Exception:
            self.internal_error(f"running {getattr(target, '__name__', 'a timer')}")

    def internal_error(self, where: str) -> None:
        """The boundary: a bug while handling this connection closes it alone.
        Called inside the ``except`` block (the traceback is logged)."""
        log.exception(
            "internal error while %s for %s (%s); closing this connection",
            where,
            self.peer,
            self.session.ident,
            extra={"event": "internal_error", "peer": self.peer, "ident": self.session.ident},
        )
        if self.session.state == CLOSED:
            # Closed already (a fault while lingering, or in a part after the close):
            # nothing left to say to the client, but the socket must not stay open.
            if self.transport is not None:
                self.transport.abort()
            return
        try:
            self.session.close(CloseReason.INTERNAL_ERROR, "internal error; this connection is closed")
        except Exception:
            log.exception("internal error while closing %s", self.peer)
            if self.session.close_reason is None:
                self.session.close_reason = CloseReason.INTERNAL_ERROR
            if self.transport is not None:
                self.transport.abort()
