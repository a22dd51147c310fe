"""Several ``--auth`` stores in order: the first that knows the ident wins.

A store that cannot answer (down, locked, timed out) does not stop the
chain: the ident is looked up in the stores after it, and the lookup is
"unavailable" only if no store that answered knows the ident. So a local
sqlite store behind a shared PostgreSQL keeps its sensors connected while
the database is down. The price: while an earlier store is down, an ident it
holds and a later store also holds gets the later store's key; keep an ident
in one store only (docs/keys.md, "Several stores").

The chain is read-only (``keys`` writes one store at a time). Its
capabilities are those of its members, found once when it is built:
``lookup_now`` answers without waiting only while every store asked can;
``changes()`` merges the feeds of the members that have one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from .base import AccessKey, AuthUnavailable, ChangeFeed, KeyReader, SyncLookup, WouldBlock


def _would_block(_ident: str) -> AccessKey | None:
    raise WouldBlock


class ChainStore:
    """``--auth A --auth B ...``."""

    def __init__(self, backends: Sequence[KeyReader]) -> None:
        self.backends = list(backends)
        self.description = " -> ".join(repr(b) for b in self.backends)
        self._now: list[Callable[[str], AccessKey | None]] = [
            b.lookup_now if isinstance(b, SyncLookup) else _would_block for b in self.backends
        ]
        self._feeds = [b for b in self.backends if isinstance(b, ChangeFeed)]

    def __repr__(self) -> str:
        return self.description

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def close(self) -> None:
        for backend in reversed(self.backends):
            await backend.close()

    async def lookup(self, ident: str) -> AccessKey | None:
        unavailable: AuthUnavailable | None = None
        for backend in self.backends:
            try:
                key = await backend.lookup(ident)
            except AuthUnavailable as e:
                unavailable = unavailable or e
                continue
            if key is not None:
                return key
        if unavailable is not None:
            raise unavailable
        return None

    def lookup_now(self, ident: str) -> AccessKey | None:
        unavailable: AuthUnavailable | None = None
        for now in self._now:
            try:
                key = now(ident)
            except AuthUnavailable as e:
                unavailable = unavailable or e
                continue
            if key is not None:
                return key
        if unavailable is not None:
            raise unavailable
        return None

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """Merge the change feeds of every member that has one."""
        if not self._feeds:
            return
        queue: asyncio.Queue[set[str] | None] = asyncio.Queue()

        async def pump(source: AsyncIterator[set[str] | None]) -> None:
            async for idents in source:
                queue.put_nowait(idents)

        tasks = [asyncio.ensure_future(pump(b.changes())) for b in self._feeds]
        try:
            while True:
                yield await queue.get()
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
