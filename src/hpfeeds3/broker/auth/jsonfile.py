"""Keys from a JSON file, in the reference's format, reloaded when it changes:

    {"bob": {"owner": "bob", "secret": "s3cret", "pubchans": ["a"], "subchans": ["a"]}}

A broken file (half-written, bad JSON, wrong shape) keeps the last good data
and logs why. Watching uses ``watchfiles`` on the file's directory, so editors
that replace the file by rename are seen too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ..config import ConfigError
from .base import AccessKey

log = logging.getLogger("hpfeeds3.broker.auth.json")


def parse_keys(data: Any) -> dict[str, AccessKey]:
    """Validate the whole document; raise ValueError naming the first problem."""
    if not isinstance(data, dict):
        raise ValueError("the root is not a mapping of ident -> key")
    keys: dict[str, AccessKey] = {}
    for ident, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"entry for {ident!r} is not a mapping")
        if not isinstance(entry.get("secret"), str) or not entry["secret"]:
            raise ValueError(f"entry for {ident!r} has no secret")
        chans = {}
        for attr in ("pubchans", "subchans"):
            value = entry.get(attr, [])
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise ValueError(f"entry for {ident!r}: {attr} must be a list of strings")
            chans[attr] = tuple(value)
        keys[ident] = AccessKey(
            ident=ident,
            secret=entry["secret"],
            owner=str(entry.get("owner", ident)),
            pubchans=chans["pubchans"],
            subchans=chans["subchans"],
        )
    return keys


class JsonFileAuthenticator:
    def __init__(self, path: str) -> None:
        self.path = path
        self._keys: dict[str, AccessKey] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._changed: asyncio.Queue[set[str]] = asyncio.Queue()

    def __repr__(self) -> str:
        return f"json:{self.path}"

    async def start(self) -> None:
        if not os.path.isfile(self.path):
            raise ConfigError(f"JSON auth file {self.path!r} does not exist")
        try:
            self._keys = self._read()
        except (OSError, ValueError) as e:
            raise ConfigError(f"JSON auth file {self.path!r}: {e}") from e
        log.info("loaded %d keys from %s", len(self._keys), self.path)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher

    async def lookup(self, ident: str) -> AccessKey | None:
        return self._keys.get(ident)

    def lookup_now(self, ident: str) -> AccessKey | None:
        return self._keys.get(ident)

    def _read(self) -> dict[str, AccessKey]:
        with open(self.path, encoding="utf-8") as f:
            return parse_keys(json.load(f))

    def reload(self) -> set[str]:
        """Re-read the file; returns the idents whose key changed (or vanished)."""
        try:
            keys = self._read()
        except (OSError, ValueError) as e:
            log.error("keeping the last good keys: cannot reload %s: %s", self.path, e)
            return set()
        changed = {i for i in self._keys.keys() | keys.keys() if self._keys.get(i) != keys.get(i)}
        self._keys = keys
        log.info("reloaded %d keys from %s (%d changed)", len(keys), self.path, len(changed))
        if changed:
            self._changed.put_nowait(changed)
        return changed

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """Yield the idents whose key changed at each reload."""
        while True:
            yield await self._changed.get()

    async def _watch(self) -> None:
        from watchfiles import awatch

        target = os.path.abspath(self.path)
        directory = os.path.dirname(target)
        try:
            async for _ in awatch(
                directory, stop_event=self._stop, debounce=200, step=50, watch_filter=lambda _c, p: p == target
            ):
                self.reload()
        except Exception:
            log.exception("watching %s failed; keys will no longer reload", self.path)
