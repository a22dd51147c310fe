"""The store objects the broker uses, made blocking for ``hpfeeds-broker keys``.

As ``client/blocking.py`` does for the client: one private event loop runs
the store's coroutines, so the ``keys`` command does one thing at a time
with exactly the broker's codec, schema and error handling. Called from
inside a running event loop (a test, an embedding program), the private
loop runs in a worker thread instead, since these calls block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from ..auth.base import AccessKey, BadArguments, KeyWriter, SkipInvalid
from ..auth.spec import open_backend, parse_spec

T = TypeVar("T")


class BlockingStore:
    """A ``KeyWriter``, blocking. Use as a context manager, or call ``close``."""

    def __init__(self, store: KeyWriter) -> None:
        self.store = store
        self.description = store.description
        self._loop = asyncio.new_event_loop()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(work)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(self._loop.run_until_complete, work).result()

    def keys(self, *, skip_invalid: SkipInvalid | None = None) -> list[AccessKey]:
        return self._run(self.store.keys(skip_invalid=skip_invalid))

    def get(self, ident: str) -> AccessKey | None:
        return self._run(self.store.get(ident))

    def add(self, key: AccessKey) -> None:
        self._run(self.store.add(key))

    def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        return self._run(self.store.modify(ident, change))

    def remove(self, ident: str) -> None:
        self._run(self.store.remove(ident))

    def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        return self._run(self.store.put_many(keys, replace=replace))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.store.close())
            self._run(self._loop.shutdown_default_executor())
        finally:
            self._loop.close()

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_store(spec: str, *, create: bool = False) -> BlockingStore:
    """Open the store named by ``spec`` (written like ``--auth``) for ``keys``.

    ``create``: make the file or table when missing; without it a missing
    file is ``StoreUnavailable``, so a mistyped path is an error rather than
    an empty store.
    """
    store = open_backend(parse_spec(spec))
    if not isinstance(store, KeyWriter):
        raise BadArguments(
            f"the {store!r} store is read-only: set HPFEEDS_<IDENT>_SECRET, _PUBCHANS and _SUBCHANS "
            "in the broker's environment"
        )
    return open_writer(store, create=create)


def open_writer(store: KeyWriter, *, create: bool = False) -> BlockingStore:
    """Open a store object (built with options of its own) for blocking use."""
    blocking = BlockingStore(store)
    try:
        blocking._run(store.open(create=create))
    except BaseException:
        blocking.close()
        raise
    return blocking
