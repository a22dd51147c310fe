"""The key a session asked for (``NeedKey``), looked up for its connection.

At AUTH the session returns ``NeedKey(ident)`` instead of calling back;
``answer`` looks the key up and hands it to the session
(``Session.key_found``), then lets the frames that came behind the AUTH run.
The key comes at once when the store can answer without waiting (sqlite, env,
JSON); otherwise (PostgreSQL, a locked sqlite) reading is paused and the
answer comes in a task (``Broker.spawn``), whose fault closes this connection
alone (``internal_error``). Either way pipelined frames wait in the session.
An address (or address and ident) blocked by the failed-AUTH limiter is
refused before any lookup or verification: guessing costs the broker nothing.

Functions, not an object: they run once per handshake, on the connection.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import metrics
from .auth import AccessKey, AuthUnavailable, WouldBlock
from .durable.feed import ConnectionFeed
from .events import Authenticated, KeyStoreUnavailable
from .session import AUTHING, NeedKey
from .text import printable

if TYPE_CHECKING:
    from .connection import Connection


def answer(conn: Connection, need: NeedKey) -> None:
    """Look up ``need.ident`` for ``conn``'s session: at once, or in a task with reading paused."""
    broker = conn.broker
    ident = need.ident
    if broker.auth_limiter.blocking and _rate_limited(conn, ident):
        return  # refused without a lookup or a verification: guessing costs nothing
    try:
        key = broker.lookup_now(ident)
    except WouldBlock:
        assert conn.transport is not None
        conn.transport.pause_reading()
        broker.spawn(_answer_later(conn, ident))
        return
    except AuthUnavailable as e:
        _unavailable(conn, str(e))
        return
    _found(conn, key)


async def _answer_later(conn: Connection, ident: str) -> None:
    try:
        try:
            key = await conn.broker.lookup(ident)
        except AuthUnavailable as e:
            _unavailable(conn, str(e))
            return
        if conn.session.state != AUTHING or _rate_limited(conn, ident):
            return  # closed meanwhile, or blocked by failures that finished while we looked
        _found(conn, key)
        conn._resume_reading()
    except Exception:
        conn.internal_error("finishing AUTH")


def _found(conn: Connection, key: AccessKey | None) -> None:
    session = conn.session
    if not session.key_found(key):
        return
    assert key is not None
    broker = conn.broker
    broker.auth_deadlines.discard(conn)
    broker.authenticated(conn)
    if key.durable:
        conn._durable = ConnectionFeed.attach(conn, key.ident)
    metrics.CONNECTION_READY.inc(key.ident)
    broker.emit(Authenticated(conn.peer, conn.id, key.ident))
    if session.resume():  # the frames that came behind the AUTH
        conn._yield_turn()


def _unavailable(conn: Connection, why: str) -> None:
    session = conn.session
    if session.state == AUTHING:
        conn.broker.emit(KeyStoreUnavailable(conn.peer, printable(session.ident_bytes), why))
    session.key_unavailable(why)


def _rate_limited(conn: Connection, ident: str) -> bool:
    """Refuse (and return True) when this address, or this address and ident, is blocked."""
    block_s = conn.broker.auth_blocked_for(conn.peer_host, ident)
    if not block_s:
        return False
    conn.broker.auth_refused(conn, ident, block_s)
    conn.session.rate_limited(math.ceil(block_s))
    return True
