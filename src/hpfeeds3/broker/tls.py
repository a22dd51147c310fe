"""Server-side TLS over a plain transport, sans I/O (``ssl.MemoryBIO``).

TLS listeners accept plain TCP and each connection runs its handshake here,
so a socket in a handshake counts against ``--max-connections`` and the
pre-auth pool from accept, and its deadline is the connection's own timer.
Encrypted bytes in, plaintext and bytes to send back out; the certificate and
every protocol choice (TLS ≥ 1.2, no renegotiation, session resumption) come
from the shared ``ssl.SSLContext``, which a certificate reload updates for
new connections.

Decryption is inside the per-turn budget: encrypted bytes wait in a backlog
and are fed to OpenSSL in steps of ``TLS_FEED_BYTES`` (one ``SSL_read`` would
otherwise process every record it holds, KeyUpdates included, in one call),
at most ``TLS_BYTES_PER_TURN`` bytes or ``TLS_RECORDS_PER_TURN`` records a
call; the connection pauses reading while ``backlogged``. Records are counted
from their headers as they are fed, and once the handshake is done each one
must bring ``TLS_MIN_RECORD_PLAINTEXT`` bytes of plaintext on average: past
``max_records_without_data`` records' worth of shortfall (KeyUpdates, empty
records, one-byte records) ``RecordsWithoutData`` is raised.

``TlsPump`` binds a ``TlsSession`` to its connection (one per TLS connection,
made when the pre-auth pool admits it): what is decrypted goes to the
session, the rest waits, reading paused, for a later turn (scheduled through
the connection's guarded ``_call_soon``); a failed handshake, a handshake past
its deadline or records without data close the connection with their reason.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import TYPE_CHECKING

from . import metrics
from .events import TlsFailed
from .metrics import Limit
from .reasons import CloseReason
from .session import AUTHING, CLOSED
from .tuning import TLS_BYTES_PER_TURN, TLS_FEED_BYTES, TLS_MIN_RECORD_PLAINTEXT, TLS_RECORDS_PER_TURN

if TYPE_CHECKING:
    from .connection import Connection

# Plaintext read from the TLS layer per call: records are at most 16 KiB.
_READ_BYTES = 256 * 1024
# A TLS record header: type, version, length (2 bytes, big-endian, at offset 3).
_HEADER = 5


class RecordsWithoutData(Exception):
    """The client sent more records than their plaintext accounts for (KeyUpdates, empty records)."""


class TlsSession:
    __slots__ = (
        "_backlog",
        "_debt",
        "_in",
        "_max_debt",
        "_next_header",
        "_obj",
        "_out",
        "closed_by_peer",
        "established",
    )

    def __init__(self, ctx: ssl.SSLContext, max_records_without_data: int) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.established = False
        self.closed_by_peer = False
        self._backlog = bytearray()  # encrypted bytes not yet fed to OpenSSL
        self._next_header = 0  # offset in the backlog of the next record header (may be past its end)
        # Records beyond what their plaintext accounts for, in 1/TLS_MIN_RECORD_PLAINTEXT of a record.
        self._debt = 0
        self._max_debt = max_records_without_data * TLS_MIN_RECORD_PLAINTEXT

    @property
    def backlogged(self) -> bool:
        """Encrypted bytes wait for a later turn (``receive(b"")`` goes on with them);
        not the start of a record header alone, which waits for the rest of it."""
        return bool(self._backlog) and (self._next_header > 0 or len(self._backlog) >= _HEADER)

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Encrypted bytes from the client → (plaintext for the session, bytes to send back),
        at most one turn's worth handled; the rest waits (``backlogged``).

        Raises ``ssl.SSLError`` for a failed handshake or a broken record, and
        ``RecordsWithoutData`` past the bound of records without plaintext."""
        backlog = self._backlog
        backlog += data
        chunks: list[bytes] = []
        fed = records = 0
        while fed < TLS_BYTES_PER_TURN and records < TLS_RECORDS_PER_TURN and not self.closed_by_peer:
            n, counted = self._step()
            if not n:
                break
            step = bytes(backlog[:n])
            del backlog[:n]
            self._next_header -= n
            fed += n
            records += counted
            charged = self.established  # records of the handshake are not charged
            self._in.write(step)
            if not self.established:
                try:
                    self._obj.do_handshake()
                except ssl.SSLWantReadError:
                    continue
                self.established = True
            plain = self._read(chunks)
            if charged:
                self._debt = max(0, self._debt + counted * TLS_MIN_RECORD_PLAINTEXT - plain)
                if self._debt > self._max_debt:
                    raise RecordsWithoutData
        plain_bytes = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return plain_bytes, self._out.read()

    def _step(self) -> tuple[int, int]:
        """How many backlog bytes to feed next (at most ``TLS_FEED_BYTES``) and how many
        records start in them. A header not yet whole is held back."""
        backlog = self._backlog
        end = len(backlog)
        n = min(end, TLS_FEED_BYTES)
        pos = self._next_header
        counted = 0
        while pos < n:
            if pos + _HEADER > end:
                n = pos  # the rest of this header has not arrived: fed with it
                break
            counted += 1
            pos += _HEADER + (backlog[pos + 3] << 8 | backlog[pos + 4])
        self._next_header = pos
        return n, counted

    def _read(self, chunks: list[bytes]) -> int:
        """Plaintext from what was fed so far, appended to ``chunks``; returns its length."""
        got = 0
        while True:
            try:
                chunk = self._obj.read(_READ_BYTES)
            except ssl.SSLWantReadError:
                return got
            except ssl.SSLZeroReturnError:  # close_notify: the client is done
                self.closed_by_peer = True
                return got
            if not chunk:  # also close_notify (read() reports it as EOF)
                self.closed_by_peer = True
                return got
            chunks.append(chunk)
            got += len(chunk)

    def discard(self) -> None:
        """The connection is closing: what waits is never decrypted."""
        self._backlog.clear()
        self._next_header = 0

    def encrypt(self, data: bytes | memoryview) -> bytes:
        self._obj.write(data)
        return self._out.read()

    def close_notify(self) -> bytes:
        """The bytes of our close_notify alert (the client may or may not answer)."""
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError included: no answer awaited
            self._obj.unwrap()
        return self._out.read()

    @property
    def version(self) -> str | None:
        return self._obj.version()


class TlsPump:
    """One connection's TLS: its ``TlsSession`` and the turns that decrypt what waits."""

    __slots__ = ("_conn", "_turn", "session")

    def __init__(self, conn: Connection, ctx: ssl.SSLContext, max_records_without_data: int) -> None:
        self._conn = conn
        self.session = TlsSession(ctx, max_records_without_data)
        self._turn = False  # a later turn goes on decrypting (_continue)

    def write(self, data: bytes) -> None:
        """The connection's writes, encrypted."""
        transport = self._conn.transport
        assert transport is not None
        transport.write(self.session.encrypt(data))

    def write_wire(self, data: bytes) -> None:
        """Bytes on the wire outside the session's stream (TLS records of its own)."""
        conn = self._conn
        assert conn.transport is not None
        conn.transport.write(data)
        if conn.feed is not None:
            conn.feed.tracker.wrote_wire(len(data))

    def closing(self) -> bool:
        """The connection closes: what waits is never decrypted. False before the
        handshake completes: there is no way to send an ERROR, it is aborted."""
        self.session.discard()
        return self.session.established

    def close_notify(self) -> None:
        """Our close_notify alert (the client may or may not answer)."""
        self.write_wire(self.session.close_notify())

    def receive(self, data: bytes) -> None:
        """Decrypt one turn's worth (``TlsSession.receive``); what remains waits, reading
        paused, for a later turn: this pump's (``_continue``), or after the session's own
        continuation or key lookup, which resume reading through the connection's
        ``_resume_reading``."""
        conn, tls = self._conn, self.session
        decrypted = self._decrypt(data)
        if decrypted is None:
            return
        if tls.closed_by_peer:
            self._closed_by_peer(decrypted)
            return
        if decrypted:
            conn._received_plain(decrypted)
        transport = conn.transport
        if not tls.backlogged or conn.session.state == CLOSED or transport is None or transport.is_closing():
            return
        transport.pause_reading()
        if not conn._turn_pending and conn.session.state != AUTHING:
            self.schedule()

    def schedule(self) -> None:
        """Encrypted bytes wait: decrypt more in a later turn."""
        if not self._turn:
            self._turn = True
            self._conn._call_soon(self._continue)

    def _continue(self) -> None:
        self._turn = False
        conn = self._conn
        if conn.session.state == CLOSED or conn.transport is None:
            return
        self.receive(b"")
        if not self.session.backlogged:
            conn._resume_reading()

    def _decrypt(self, data: bytes) -> bytes | None:
        """Decrypt; start the session when the handshake completes. None: the connection is closed."""
        tls = self.session
        was_established = tls.established
        try:
            plain, reply = tls.receive(data)
        except ssl.SSLError as e:
            self.failed(str(e.reason or e))
            return None
        except RecordsWithoutData:
            self._records_without_data()
            return None
        if reply:
            self.write_wire(reply)
        if not was_established and tls.established:
            self._conn._greet()
        return plain

    def _closed_by_peer(self, last: bytes) -> None:
        """The client's close_notify: handle what came before it, answer it (clients wait
        for ours), then treat it as EOF."""
        conn, tls = self._conn, self.session
        tls.closed_by_peer = False  # once
        tls.discard()  # nothing after close_notify counts
        if last:
            conn._received_plain(last)
        if conn.transport is not None and not conn._lost:
            self.close_notify()
            if not conn.eof_received():
                conn.transport.close()

    def failed(self, why: str) -> None:
        conn = self._conn
        event = TlsFailed(conn.peer, why, self.session.established)
        conn.broker.emit(event)
        conn.session.close(CloseReason(event.reason), None, abort=True)

    def _records_without_data(self) -> None:
        conn = self._conn
        limit = conn.broker.config.limits.max_tls_records_without_data
        reason = CloseReason.TLS_RECORDS_WITHOUT_DATA
        metrics.limit_rejected(Limit.MAX_TLS_RECORDS_WITHOUT_DATA)
        why = f"too many TLS records without data (more than {limit} beyond what their plaintext accounts for)"
        conn.broker.emit(TlsFailed(conn.peer, why, True, reason))
        self.session.discard()
        conn.session.close(reason, f"too many TLS records without data (limit {limit})")

    def handshake_timeout(self) -> None:
        """The connection's deadline for the handshake passed (broker.tls_deadlines)."""
        conn = self._conn
        if not self.session.established and conn.session.state != CLOSED:
            metrics.limit_rejected(Limit.TLS_HANDSHAKE_TIMEOUT)
            limit = conn.broker.config.limits.tls_handshake_timeout_s
            self.failed(f"no handshake within {limit:g} s")
