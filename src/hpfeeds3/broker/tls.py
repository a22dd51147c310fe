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
"""

from __future__ import annotations

import contextlib
import ssl

from .tuning import TLS_BYTES_PER_TURN, TLS_FEED_BYTES, TLS_MIN_RECORD_PLAINTEXT, TLS_RECORDS_PER_TURN

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

    def encrypt(self, data: bytes) -> bytes:
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
