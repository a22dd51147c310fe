"""A received message, and how text arguments become protocol bytes."""

from __future__ import annotations

from typing import NamedTuple

#: ``str`` arguments are encoded as UTF-8; ``surrogateescape`` round-trips the
#: non-UTF-8 bytes that ``Message`` fields decoded from the wire may hold.
ENCODING = "utf-8"
ERRORS = "surrogateescape"


class Message(NamedTuple):
    """One PUBLISH delivered by the broker.

    ``ident`` is the publisher's authenticated ident (collectors use it as the
    sensor id); ``ident`` and ``channel`` are decoded from UTF-8, with any
    invalid byte kept as a lone surrogate so that ``to_bytes`` gives back the
    exact wire bytes. ``payload`` is the raw bytes.
    """

    ident: str
    channel: str
    payload: bytes


def to_bytes(value: str | bytes | bytearray | memoryview, what: str) -> bytes:
    """Channel, ident, secret or payload as bytes (``str`` → UTF-8)."""
    if isinstance(value, str):
        return value.encode(ENCODING, ERRORS)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def to_text(value: bytes) -> str:
    """Wire bytes as ``str`` (the inverse of ``to_bytes``)."""
    return value.decode(ENCODING, ERRORS)
