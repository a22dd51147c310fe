"""The PostgreSQL key store: the ``authkeys`` table the broker's
``PostgresAuthenticator`` reads, written from the ``keys`` CLI.

Synchronous on the outside (one private event loop runs asyncpg); every
operation is one transaction under a deadline, so an unreachable database is
a clear ``StoreUnavailable`` within ``timeout_s``, never a hang. Writes create
the table and its change trigger when missing (``ensure_schema``), and the
trigger tells every broker which ident changed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TypeVar

import asyncpg

from ..auth.base import AccessKey
from ..auth.postgres import LOOKUP_SQL, ensure_schema, row_to_key
from .errors import IdentExists, InvalidKey, NoSuchIdent, StoreUnavailable
from .sqlite import encode_channels
from .store import KeyStore, redact_dsn

# Deadline of one command's connect + transaction.
TIMEOUT_S = 10.0

T = TypeVar("T")

_SELECT_ALL = "SELECT DISTINCT ON (ident) ident, secret, owner, pubchans, subchans FROM authkeys ORDER BY ident, id"
_INSERT = "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) VALUES ($1, $2, $3, $4, $5)"
_UPDATE = "UPDATE authkeys SET owner = $1, secret = $3, pubchans = $4, subchans = $5 WHERE ident = $2"


def _args(key: AccessKey) -> tuple[str, str, str, str, str]:
    return (key.owner, key.ident, key.secret, encode_channels(key.pubchans), encode_channels(key.subchans))


def _key(row: asyncpg.Record) -> AccessKey:
    try:
        return row_to_key(row)
    except ValueError:
        raise InvalidKey(f"ident {row['ident']!r}: channels are not a JSON list") from None


class PostgresKeyStore(KeyStore):
    def __init__(self, dsn: str, *, create: bool = False, timeout_s: float = TIMEOUT_S) -> None:
        self.dsn = dsn
        self.description = redact_dsn(dsn)
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None
        self._run(self._connect())
        if create:
            self._run(self._ensure())

    async def _connect(self) -> None:
        self._conn = await asyncpg.connect(self.dsn, timeout=self.timeout_s)

    async def _ensure(self) -> None:
        await ensure_schema(self._db)

    @property
    def _db(self) -> asyncpg.Connection:
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._complete(asyncio.wait_for(self._conn.close(), 2.0))
            except Exception:
                self._conn.terminate()
            self._conn = None
        self._loop.close()

    def _run(self, work: Awaitable[T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(self.timeout_s):
                return await work

        try:
            return self._complete(bounded())
        except TimeoutError:
            raise StoreUnavailable(f"{self.description}: no answer within {self.timeout_s:g} s") from None
        except (ValueError, TypeError) as err:
            raise StoreUnavailable(f"{self.description}: bad DSN ({err})") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            text = str(err).strip() or type(err).__name__
            raise StoreUnavailable(f"{self.description}: {text}") from None

    def _complete(self, work: Coroutine[object, object, T]) -> T:
        """Run on our private loop; from inside a running loop (a test, an
        embedding program), do it in a worker thread: the store is blocking."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(work)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(self._loop.run_until_complete, work).result()

    def _table_exists(self) -> Awaitable[bool]:
        return self._db.fetchval("SELECT to_regclass('authkeys') IS NOT NULL")

    def _read(self, query: Callable[[asyncpg.Connection], Awaitable[T]], empty: T) -> T:
        async def go() -> T:
            if not await self._table_exists():
                return empty
            return await query(self._db)

        return self._run(go())

    def _write(self, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async def go() -> T:
            await ensure_schema(self._db)
            async with self._db.transaction():
                return await body(self._db)

        return self._run(go())

    def keys(self) -> list[AccessKey]:
        async def query(db: asyncpg.Connection) -> list[AccessKey]:
            return [_key(r) for r in await db.fetch(_SELECT_ALL)]

        return self._read(query, [])

    def get(self, ident: str) -> AccessKey | None:
        async def query(db: asyncpg.Connection) -> AccessKey | None:
            row = await db.fetchrow(LOOKUP_SQL, ident)
            return None if row is None else _key(row)

        return self._read(query, None)

    @staticmethod
    async def _locked(db: asyncpg.Connection, ident: str) -> AccessKey | None:
        row = await db.fetchrow(LOOKUP_SQL + " FOR UPDATE", ident)
        return None if row is None else _key(row)

    def add(self, key: AccessKey) -> None:
        async def body(db: asyncpg.Connection) -> None:
            if await db.fetchval("SELECT 1 FROM authkeys WHERE ident = $1", key.ident):
                raise IdentExists(key.ident)
            try:
                await db.execute(_INSERT, *_args(key))
            except asyncpg.UniqueViolationError:
                raise IdentExists(key.ident) from None

        self._write(body)

    def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        async def body(db: asyncpg.Connection) -> AccessKey:
            old = await self._locked(db, ident)
            if old is None:
                raise NoSuchIdent(ident)
            new = change(old)
            assert new.ident == ident, "modify must keep the ident"
            await db.execute(_UPDATE, *_args(new))
            return new

        return self._write(body)

    def remove(self, ident: str) -> AccessKey:
        async def body(db: asyncpg.Connection) -> AccessKey:
            old = await self._locked(db, ident)
            if old is None:
                raise NoSuchIdent(ident)
            await db.execute("DELETE FROM authkeys WHERE ident = $1", ident)
            return old

        return self._write(body)

    def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        new = list(keys)

        async def body(db: asyncpg.Connection) -> int:
            # One writer at a time, so the clash check below stays true.
            await db.execute("LOCK TABLE authkeys IN SHARE ROW EXCLUSIVE MODE")
            existing = {r["ident"] for r in await db.fetch("SELECT ident FROM authkeys")}
            clash = sorted(k.ident for k in new if k.ident in existing)
            if clash and not replace:
                raise IdentExists(clash)
            await db.executemany(_UPDATE, [_args(k) for k in new if k.ident in existing])
            await db.executemany(_INSERT, [_args(k) for k in new if k.ident not in existing])
            return len(new)

        return self._write(body)
