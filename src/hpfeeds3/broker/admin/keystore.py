"""The console's one way into the key store: the layer ``hpfeeds-broker keys`` uses.

Every key-store call of the console is here. The store's writer (the object
``hpfeeds-broker keys`` uses, ``auth.base.KeyWriter``) is opened once, at the
first call, and its coroutines are awaited on the broker's loop, one
operation at a time (sqlite's run on a worker thread, PostgreSQL's are
asynchronous, JSON's read and write one small file); ``close`` closes it when
the console stops. The broker's change detection (sqlite poll, JSON watch,
PostgreSQL notify) then applies a change to live sessions, and ``ConsoleKeys``
also asks the broker to re-check the ident at once.

The store written is the first ``--auth`` that can be written (sqlite, JSON or
PostgreSQL); with only ``env`` the keys are read-only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

from ..auth.base import AccessKey, BadArguments, KeyStoreError, KeyWriter, NoSuchIdent, check_channels, make_key
from ..auth.records import generate_secret
from ..auth.spec import backend, open_backend, parse_spec

__all__ = ["ConsoleKeys", "KeyStoreError", "ReadOnlyKeys"]


class ReadOnlyKeys(KeyStoreError):
    """No writable key store is configured."""


def writable_spec(auth_specs: Iterable[str]) -> str | None:
    for spec in auth_specs:
        try:
            kind = parse_spec(spec).kind
        except BadArguments:
            continue
        if backend(kind).writable:
            return spec
    return None


def public(key: AccessKey) -> dict[str, Any]:
    return {"ident": key.ident, "owner": key.owner, "pubchans": list(key.pubchans), "subchans": list(key.subchans)}


class ConsoleKeys:
    def __init__(self, auth_specs: Iterable[str], recheck: Callable[[set[str]], None]) -> None:
        self.spec = writable_spec(auth_specs)
        self._recheck = recheck
        self._store: KeyWriter | None = None
        self._one_at_a_time = asyncio.Lock()

    @property
    def writable(self) -> bool:
        return self.spec is not None

    async def _run(self, op: Callable[[KeyWriter], Awaitable[Any]]) -> Any:
        spec = self.spec
        if spec is None:
            raise ReadOnlyKeys("no writable key store: --auth is env only")
        async with self._one_at_a_time:
            store = self._store
            if store is None:
                store = open_backend(parse_spec(spec))
                await store.open(create=False)  # a failure is tried again at the next call
                self._store = store
            return await op(store)

    async def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            async with self._one_at_a_time:
                await store.close()

    async def all(self) -> list[AccessKey]:
        if self.spec is None:
            return []
        result: list[AccessKey] = await self._run(lambda s: s.keys())
        return result

    async def create(self, ident: str, owner: str, pubchans: list[str], subchans: list[str]) -> AccessKey:
        key = make_key(ident, generate_secret(), owner, pubchans, subchans)
        await self._run(lambda s: s.add(key))
        return key

    async def change_channels(self, ident: str, pub: list[str], sub: list[str], *, grant: bool) -> AccessKey:
        add_pub = check_channels("publish channel", pub)
        add_sub = check_channels("subscribe channel", sub)

        def change(key: AccessKey) -> AccessKey:
            if grant:
                return replace(
                    key,
                    pubchans=key.pubchans + tuple(c for c in add_pub if c not in key.pubchans),
                    subchans=key.subchans + tuple(c for c in add_sub if c not in key.subchans),
                )
            return replace(
                key,
                pubchans=tuple(c for c in key.pubchans if c not in add_pub),
                subchans=tuple(c for c in key.subchans if c not in add_sub),
            )

        key: AccessKey = await self._run(lambda s: s.modify(ident, change))
        self._recheck({ident})
        return key

    async def rotate(self, ident: str) -> AccessKey:
        secret = generate_secret()
        key: AccessKey = await self._run(lambda s: s.modify(ident, lambda k: replace(k, secret=secret)))
        self._recheck({ident})
        return key

    async def remove(self, ident: str) -> AccessKey:
        async def remove(store: KeyWriter) -> AccessKey:
            key = await store.get(ident)
            if key is None:
                raise NoSuchIdent(ident)
            await store.remove(ident)
            return key

        key: AccessKey = await self._run(remove)
        self._recheck({ident})
        return key
