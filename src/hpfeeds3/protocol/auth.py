"""The hpfeeds challenge: ``SHA1(nonce + secret)``.

The broker sends a random nonce in INFO; the client proves it knows the secret
without sending it. See SECURITY.md for what this does and does not protect.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .frames import NONCE_LEN


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)


def sign(nonce: bytes, secret: bytes) -> bytes:
    return hashlib.sha1(nonce + secret).digest()


def verify(nonce: bytes, secret: bytes, digest: bytes) -> bool:
    """Constant-time comparison of the client's digest with the expected one."""
    return hmac.compare_digest(sign(nonce, secret), digest)
