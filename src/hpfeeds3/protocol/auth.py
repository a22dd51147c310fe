"""The hpfeeds challenge: ``SHA1(nonce + secret)``.

The broker sends a random nonce in INFO; the client proves it knows the secret
without sending it. See SECURITY.md for what this does and does not protect.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator

from .frames import NONCE_LEN

# Nonces are cut from one read of the OS's random source per 1,024 connections:
# the same bytes os.urandom gives, without a system call per handshake. A forked
# child starts a stream of its own (it must not hand out its parent's next nonces).
_NONCES_PER_READ = 1024


def _nonces() -> Iterator[bytes]:
    while True:
        block = os.urandom(NONCE_LEN * _NONCES_PER_READ)
        yield from [block[i : i + NONCE_LEN] for i in range(0, len(block), NONCE_LEN)]


_next_nonce = _nonces().__next__


def new_nonce() -> bytes:
    return _next_nonce()


def _new_stream() -> None:
    global _next_nonce
    _next_nonce = _nonces().__next__


os.register_at_fork(after_in_child=_new_stream)


def sign(nonce: bytes, secret: bytes) -> bytes:
    return hashlib.sha1(nonce + secret).digest()


def verify(nonce: bytes, secret: bytes, digest: bytes) -> bool:
    """Constant-time comparison of the client's digest with the expected one."""
    return hmac.compare_digest(sign(nonce, secret), digest)
