"""A TLS 1.3 client that writes its own records: KeyUpdates, empty records,
records of any size, which ``ssl`` cannot be asked to send.

The handshake is Python's own (``ssl.SSLObject`` over memory BIOs, on a real
socket); the client's application traffic secret comes from the context's key
log, and from there every record the client sends is built here (RFC 8446
§5.2, §7.1-7.3, with ``cryptography``'s AEADs). What the broker sends back is
read through the same ``SSLObject``, whose receiving keys are untouched.
"""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

ALERT = 0x15
APPLICATION_DATA = 0x17
HANDSHAKE = 0x16
# A KeyUpdate handshake message, update_not_requested (RFC 8446 §4.6.3).
KEY_UPDATE = bytes([24, 0, 0, 1, 0])

_SUITES: dict[str, tuple[type[AESGCM] | type[ChaCha20Poly1305], int, hashes.HashAlgorithm]] = {
    "TLS_AES_128_GCM_SHA256": (AESGCM, 16, hashes.SHA256()),
    "TLS_AES_256_GCM_SHA384": (AESGCM, 32, hashes.SHA384()),
    "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32, hashes.SHA256()),
}


def _expand_label(hash_: hashes.HashAlgorithm, secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(hash_, length, info).derive(secret)


class RecordClient:
    """Connected and handshaken over TLS 1.3; ``record``/``key_update`` build records, ``send`` writes them."""

    def __init__(self, port: int, ca: str, keylog: Path, host: str = "127.0.0.1") -> None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.keylog_filename = str(keylog)
        self.sock = socket.create_connection((host, port), timeout=10)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self._in.write(data)
        self.sock.sendall(self._out.read())  # the client's Finished
        cipher = self.tls.cipher()
        assert cipher is not None and self.tls.version() == "TLSv1.3"
        self._aead, self._key_len, self._hash = _SUITES[cipher[0]]
        lines = keylog.read_text().split("\n")
        secret = next(line.split()[2] for line in lines if line.startswith("CLIENT_TRAFFIC_SECRET_0 "))
        self._keys(bytes.fromhex(secret))

    def _keys(self, secret: bytes) -> None:
        self._secret = secret
        self._cipher = self._aead(_expand_label(self._hash, secret, b"key", self._key_len))
        self._iv = int.from_bytes(_expand_label(self._hash, secret, b"iv", 12), "big")
        self._seq = 0

    def record(self, content: bytes, content_type: int = APPLICATION_DATA) -> bytes:
        """One encrypted record of ``content`` (which may be empty)."""
        inner = content + bytes([content_type])
        header = struct.pack(">BHH", APPLICATION_DATA, 0x0303, len(inner) + 16)
        nonce = (self._iv ^ self._seq).to_bytes(12, "big")
        self._seq += 1
        return header + self._cipher.encrypt(nonce, inner, header)

    def key_update(self) -> bytes:
        """A KeyUpdate record; the records after it use the next traffic secret."""
        rec = self.record(KEY_UPDATE, HANDSHAKE)
        self._keys(_expand_label(self._hash, self._secret, b"traffic upd", self._hash.digest_size))
        return rec

    def records(self, data: bytes, size: int) -> bytes:
        """``data`` as records of ``size`` plaintext bytes each."""
        return b"".join(self.record(data[i : i + size]) for i in range(0, len(data), size))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_plain(self, timeout: float = 5.0) -> bytes:
        """Plaintext from the broker (b"" at EOF, a reset or a TLS alert)."""
        self.sock.settimeout(timeout)
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, ssl.SSLZeroReturnError):
                return b""
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return b""
            if not data:
                return b""
            self._in.write(data)

    def close(self) -> None:
        self.sock.close()
