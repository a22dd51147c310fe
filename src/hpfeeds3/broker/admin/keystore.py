"""The console's one way into the key store: the layer ``hpfeeds-broker keys`` uses.

Every key-store call of the console is here. Stores are synchronous, so each
operation opens the store, does one thing and closes it on a worker thread,
exactly as one ``keys`` command would; the broker's change detection (sqlite
poll, JSON watch, PostgreSQL notify) then applies the change to live sessions,
and ``ConsoleKeys`` also asks the broker to re-check the ident at once.

The store written is the first ``--auth`` that can be written (sqlite, JSON or
PostgreSQL); with only ``env`` the keys are read-only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from ..auth.base import AccessKey, BadArguments, KeyStoreError, NoSuchIdent, check_channels, make_key
from ..auth.records import generate_secret
from ..auth.spec import parse_spec
from ..keys import BlockingStore, open_store

__all__ = ["ConsoleKeys", "KeyStoreError", "ReadOnlyKeys"]


class ReadOnlyKeys(KeyStoreError):
    """No writable key store is configured."""


def writable_spec(auth_specs: Iterable[str]) -> str | None:
    for spec in auth_specs:
        try:
            kind = parse_spec(spec).kind
        except BadArguments:
            continue
        if kind != "env":
            return spec
    return None


def public(key: AccessKey) -> dict[str, Any]:
    return {"ident": key.ident, "owner": key.owner, "pubchans": list(key.pubchans), "subchans": list(key.subchans)}


class ConsoleKeys:
    def __init__(self, auth_specs: Iterable[str], recheck: Callable[[set[str]], None]) -> None:
        self.spec = writable_spec(auth_specs)
        self._recheck = recheck

    @property
    def writable(self) -> bool:
        return self.spec is not None

    async def _run(self, op: Callable[[BlockingStore], Any]) -> Any:
        spec = self.spec
        if spec is None:
            raise ReadOnlyKeys("no writable key store: --auth is env only")

        def work() -> Any:
            with open_store(spec) as store:
                return op(store)

        return await asyncio.to_thread(work)

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
        def remove(store: BlockingStore) -> AccessKey:
            key = store.get(ident)
            if key is None:
                raise NoSuchIdent(ident)
            store.remove(ident)
            return key

        key: AccessKey = await self._run(remove)
        self._recheck({ident})
        return key
