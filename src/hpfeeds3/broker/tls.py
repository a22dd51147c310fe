"""Server-side TLS over a plain transport, sans I/O (``ssl.MemoryBIO``).

TLS listeners accept plain TCP and each connection runs its handshake here,
so a socket in a handshake counts against ``--max-connections`` and the
pre-auth pool from accept, and its deadline is the connection's own timer.
Encrypted bytes in, plaintext and bytes to send back out; the certificate and
every protocol choice (TLS ≥ 1.2, no renegotiation, session resumption) come
from the shared ``ssl.SSLContext``, which a certificate reload updates for
new connections.
"""

from __future__ import annotations

import contextlib
import ssl

# Plaintext read from the TLS layer per call: records are at most 16 KiB.
_READ_BYTES = 256 * 1024


class TlsSession:
    __slots__ = ("_in", "_obj", "_out", "closed_by_peer", "established")

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.established = False
        self.closed_by_peer = False

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Encrypted bytes from the client → (plaintext for the session, bytes to send back).

        Raises ``ssl.SSLError`` for a failed handshake or a broken record."""
        self._in.write(data)
        if not self.established:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return b"", self._out.read()
            self.established = True
        chunks = []
        while True:
            try:
                chunk = self._obj.read(_READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the client is done
                self.closed_by_peer = True
                break
            if not chunk:  # also close_notify (read() reports it as EOF)
                self.closed_by_peer = True
                break
            chunks.append(chunk)
        plain = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return plain, self._out.read()

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
