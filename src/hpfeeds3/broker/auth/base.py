"""The Authenticator interface and the access key it returns.

Every backend answers one question per AUTH: ``await lookup(ident)``. There is
no cache: a key added, changed or removed in the store takes effect for the
next connection (the spec promises "you don't need to restart").
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class AccessKey:
    """One row of the ``authkeys`` table: who may publish and subscribe where."""

    ident: str
    secret: str
    owner: str = ""
    pubchans: tuple[str, ...] = ()
    subchans: tuple[str, ...] = ()


class AuthUnavailable(Exception):
    """The store could not answer (down, locked, timed out). The client gets a
    clear auth error; the broker keeps serving everyone else."""


class WouldBlock(Exception):
    """``lookup_now`` cannot answer without waiting: use ``await lookup``."""


@runtime_checkable
class Authenticator(Protocol):
    async def start(self) -> None:
        """Open connections, start watchers. Raise ``ConfigError`` if unusable."""

    async def close(self) -> None: ...

    async def lookup(self, ident: str) -> AccessKey | None:
        """The key for ``ident``, ``None`` if unknown; ``AuthUnavailable`` if the store failed."""
        ...

    # Optional, for stores that can answer in microseconds without I/O waits
    # (sqlite, env, JSON): ``lookup_now(ident)`` returns what ``lookup`` would,
    # or raises ``WouldBlock``. It saves a task and a loop turn per AUTH.


def parse_channels(value: object) -> tuple[str, ...]:
    """Channels as stored by the reference: a JSON list in a TEXT column (or a list already)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return _parse_channel_text(value)
    if not isinstance(value, list):
        raise ValueError("channels must be a JSON list")
    return tuple(map(str, value))


@functools.lru_cache(maxsize=4096)
def _parse_channel_text(text: str) -> tuple[str, ...]:
    # Every AUTH reads the key's channel columns; the same text parses to the same tuple.
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError("channels must be a JSON list")
    return tuple(map(str, value))
