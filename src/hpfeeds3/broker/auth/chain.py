"""Several ``--auth`` backends in order: the first that knows the ident wins."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from .base import AccessKey, Authenticator, WouldBlock


class ChainAuthenticator:
    def __init__(self, backends: Sequence[Authenticator]) -> None:
        self.backends = list(backends)

    def __repr__(self) -> str:
        return " -> ".join(repr(b) for b in self.backends)

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def close(self) -> None:
        for backend in reversed(self.backends):
            await backend.close()

    async def lookup(self, ident: str) -> AccessKey | None:
        for backend in self.backends:
            key = await backend.lookup(ident)
            if key is not None:
                return key
        return None

    def lookup_now(self, ident: str) -> AccessKey | None:
        for backend in self.backends:
            now = getattr(backend, "lookup_now", None)
            if now is None:
                raise WouldBlock
            key = now(ident)
            if key is not None:
                return key
        return None

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """Merge the change notifications of every backend that has them."""
        queue: asyncio.Queue[set[str] | None] = asyncio.Queue()

        async def pump(source: AsyncIterator[set[str] | None]) -> None:
            async for idents in source:
                queue.put_nowait(idents)

        tasks = [
            asyncio.ensure_future(pump(b.changes()))  # type: ignore[attr-defined]
            for b in self.backends
            if hasattr(b, "changes")
        ]
        if not tasks:
            return
        try:
            while True:
                yield await queue.get()
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
