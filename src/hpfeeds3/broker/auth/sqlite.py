"""The sqlite store: the reference broker's ``sqlite.db``, read and written.

Schema: the reference's three tables, byte for byte, so either broker opens a
file the other made, plus an index on ``authkeys(ident)`` wherever the schema
is ensured (by the broker at start, by ``keys`` before a write): without it an
AUTH is a full-table scan on the event loop. A file we create gets it unique;
an existing file gets a plain one (the reference's table may hold two rows
for one ident), and the table itself is never altered. A file the broker may
only read is served without the index (a warning says so).

Durable keys are the idents listed in a table of their own, ``durable_keys``,
created by the first write of a durable key, so ``authkeys`` keeps the
reference's columns and the reference broker reads the file as before. A
lookup joins it; a file without it has no durable key (the broker looks
again whenever the file changes).

Codec: a row is a key only if ``make_key`` accepts it (text ident, non-empty
text secret, channel lists of non-empty text); the broker answers "no such
key" for any other row and logs why once. Two rows for one ident: the first
(lowest ``id``) is the key, as in the reference.

Reader: a lookup first runs inline with no busy wait (microseconds with the
index); only when a writer holds the lock does it move to a thread that
retries for a bounded time, so the event loop never waits. Changes: ``PRAGMA
data_version`` polled, one cheap query whatever the table size.

Snapshot: a query costs the event loop 15-30 µs (a shared lock taken and
given back, the header read, the statement), a large part of a handshake in a
reconnect storm where every sensor has its own key. So the rows are also read
whole, in a thread, into memory (at start, and after each change the poll
sees; at most ``SNAPSHOT_MAX_ROWS``), together with the file's change counter
read under the same read lock. A lookup reads the counter from the file
(``pread`` of the header, one system call) and answers from the snapshot only
when it is the snapshot's: every commit by any process changes it, so a key
removed or changed is never served from memory, not even for a moment; until
the next snapshot such lookups query the file as before. A file in WAL mode
(whose commits leave the counter alone) is never served from a snapshot.

Writer: each write is one transaction that takes the write lock at ``BEGIN
IMMEDIATE`` and waits up to ``busy_timeout_s`` for it; beyond that it fails
with "locked" rather than hanging. ``modify`` rewrites every row of the ident
and ``remove`` deletes them all, so no stale twin survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TypeVar

from ..config import ConfigError
from .base import (
    AccessKey,
    AuthUnavailable,
    IdentExists,
    InvalidKey,
    InvalidKeyLog,
    NoSuchIdent,
    SkipInvalid,
    StoreUnavailable,
    WouldBlock,
    decode_row,
    encode_channels,
)

log = logging.getLogger("hpfeeds3.broker.auth.sqlite")

T = TypeVar("T")

# The reference broker's tables, exactly as it creates them (logs/stats are
# unused but kept so the reference broker can open a file we created).
REFERENCE_SCHEMA = (
    "create table if not exists logs (id integer primary key autoincrement, data TEXT)",
    "create table if not exists stats (id integer primary key autoincrement, ak TEXT, uid TEXT, data TEXT)",
    "create table if not exists authkeys (id integer primary key autoincrement,"
    " owner TEXT, ident TEXT, secret TEXT, pubchans TEXT, subchans TEXT)",
)
DURABLE_SCHEMA = "create table if not exists durable_keys (ident TEXT primary key not null)"
NEW_IDENT_INDEX = "create unique index if not exists authkeys_ident on authkeys (ident)"
IDENT_INDEX = "create index if not exists authkeys_ident on authkeys (ident)"

_COLUMNS = "ident, secret, owner, pubchans, subchans"
_DURABLE = "exists (select 1 from durable_keys d where d.ident = authkeys.ident)"
# Without durable_keys (no durable key yet: the file is as the reference made it), and with it.
LOOKUP_SQL = f"select {_COLUMNS}, 0 from authkeys where ident = ? order by id limit 1"
DURABLE_LOOKUP_SQL = f"select {_COLUMNS}, {_DURABLE} from authkeys where ident = ? order by id limit 1"
_DURABLE_SELECT_ALL = f"select {_COLUMNS}, {_DURABLE} from authkeys order by id"
_SELECT_ALL = f"select {_COLUMNS}, 0 from authkeys order by id"

# Keys held in memory at most (the snapshot; a larger table is queried per lookup):
# about 0.5 KiB each.
SNAPSHOT_MAX_ROWS = 100_000
# The header bytes that must match for the snapshot to hold: the format's write
# and read versions (1, 1: rollback journal; 2 is WAL) up to the change counter.
_STAMP_OFFSET = 18
_STAMP_BYTES = 10  # offsets 18..27; the change counter is 24..27
_ROLLBACK_JOURNAL = b"\x01\x01"

# How long a lookup waits (in a thread) for a writer's lock before "unavailable".
LOCKED_TIMEOUT_S = 2.0
# How long a write waits for a broker's (or another command's) lock.
BUSY_TIMEOUT_S = 5.0
DEFAULT_PATH = "sqlite.db"

Row = tuple[object, object, object, object, object, object]


def create_private(path: str) -> None:
    """Create ``path`` empty and readable by its owner only, unless it exists.

    The store holds secrets in plaintext (the protocol needs them), so a new
    one is mode 0600; sqlite gives its journal files the same mode. An
    existing file is left as its owner set it.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def has_table(db: sqlite3.Connection, name: str = "authkeys") -> bool:
    row = db.execute("select 1 from sqlite_master where type = 'table' and name = ?", (name,)).fetchone()
    return row is not None


def lookup_sql(db: sqlite3.Connection) -> str:
    """The lookup for this file: with ``durable_keys`` when it has that table."""
    return DURABLE_LOOKUP_SQL if has_table(db, "durable_keys") else LOOKUP_SQL


def ensure_schema(db: sqlite3.Connection) -> None:
    """In a write transaction: the reference tables when missing, and the ident index."""
    created = not has_table(db)
    for statement in REFERENCE_SCHEMA:
        db.execute(statement)
    db.execute(NEW_IDENT_INDEX if created else IDENT_INDEX)


def row_to_key(row: Row) -> AccessKey:
    """The codec: ``InvalidKey`` for a row that is not a valid key."""
    return decode_row(*row)


def _busy(err: sqlite3.Error) -> bool:
    text = str(err)
    return "locked" in text or "busy" in text


class SqliteStore:
    """``--auth sqlite`` (./sqlite.db) or ``--auth sqlite:PATH``."""

    def __init__(
        self,
        path: str = DEFAULT_PATH,
        *,
        locked_timeout_s: float = LOCKED_TIMEOUT_S,
        poll_s: float = 1.0,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self.locked_timeout_s = locked_timeout_s
        self.poll_s = poll_s
        self.busy_timeout_s = busy_timeout_s
        self._inline: sqlite3.Connection | None = None
        self._lookup_sql = LOOKUP_SQL  # DURABLE_LOOKUP_SQL once the file has durable_keys
        self._local = threading.local()
        self._invalid = InvalidKeyLog(self.description)
        self._db: sqlite3.Connection | None = None  # the writer's
        # The rows in memory (first row per ident; a valid one replaced by its key once
        # decoded) and the header stamp they hold for.
        self._snapshot: dict[str, Row | AccessKey] | None = None
        self._snapshot_stamp = b""
        # The keys the last snapshot decoded, by row: a snapshot after a change decodes
        # only the rows that changed.
        self._decoded: dict[Row, AccessKey] = {}
        self._header_fd = -1  # the file, opened once, for the header's change counter

    @classmethod
    def from_spec(cls, target: str, *, poll_s: float = 1.0) -> SqliteStore:
        return cls(target, poll_s=poll_s)

    def __repr__(self) -> str:
        return self.description

    # --- reader ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the file and schema when missing (as the reference does); ``ConfigError`` if unusable."""
        if os.path.isdir(self.path):
            raise ConfigError(f"sqlite auth database {self.path!r} is a directory")
        try:
            create_private(self.path)
        except OSError as e:
            raise ConfigError(f"cannot open sqlite auth database {self.path!r}: {e.strerror}") from e
        try:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            try:
                self._prepare(db)
            finally:
                db.close()
            # timeout=0: never wait inline for a writer's lock; fall back to a thread.
            self._inline = sqlite3.connect(self.path, timeout=0, check_same_thread=False, isolation_level=None)
            self._lookup_sql = lookup_sql(self._inline)
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open sqlite auth database {self.path!r}: {e}") from e
        with contextlib.suppress(OSError):
            self._header_fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        await self._take_snapshot()

    def _prepare(self, db: sqlite3.Connection) -> None:
        try:
            with _transaction(db):
                ensure_schema(db)
        except sqlite3.OperationalError as e:
            if not has_table(db):
                raise
            log.warning("%s: cannot add the index on ident (%s); lookups scan the table", self.path, e)

    async def close(self) -> None:
        for conn in (self._inline, self._db):
            if conn is not None:
                conn.close()
        self._inline = self._db = None
        self._snapshot = None
        if self._header_fd >= 0:
            os.close(self._header_fd)
            self._header_fd = -1

    async def lookup(self, ident: str) -> AccessKey | None:
        try:
            return self.lookup_now(ident)
        except WouldBlock:
            return self._invalid.serve(ident, await asyncio.to_thread(self._lookup_waiting, ident), row_to_key)

    def lookup_now(self, ident: str) -> AccessKey | None:
        """From the snapshot while the file is unchanged, else the inline query;
        ``WouldBlock`` while a writer holds the lock."""
        conn = self._inline
        if conn is None:
            raise AuthUnavailable(f"{self.description}: not started")
        snapshot = self._snapshot
        if snapshot is not None and self._stamp() == self._snapshot_stamp:
            found = snapshot.get(ident)
            if found is None or found.__class__ is not tuple:
                return found  # type: ignore[return-value]  # no such key, or decoded already
            key = self._invalid.serve(ident, found, row_to_key)
            if key is not None:
                snapshot[ident] = key  # decoded once
            return key
        try:
            row = conn.execute(self._lookup_sql, (ident,)).fetchone()
        except sqlite3.OperationalError as e:
            if _busy(e):
                raise WouldBlock from e
            raise AuthUnavailable(f"{self.description}: {e}") from e
        except sqlite3.Error as e:
            raise AuthUnavailable(f"{self.description}: {e}") from e
        return self._invalid.serve(ident, row, row_to_key)

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """Yield ``None`` (recheck every live ident) after another connection commits."""
        last = self._data_version()  # the baseline, before the first wait
        while self._inline is not None:
            await asyncio.sleep(self.poll_s)
            version = self._data_version()
            if version is None:
                continue  # locked or briefly unavailable: try at the next poll
            if last is not None and version != last:
                self._refresh_lookup_sql()  # keys may have made durable_keys (or SQL dropped it)
                await self._take_snapshot()
                yield None
            last = version

    def _stamp(self) -> bytes:
        """The header bytes from the format versions to the change counter; b"" when unreadable."""
        try:
            return os.pread(self._header_fd, _STAMP_BYTES, _STAMP_OFFSET)
        except OSError:
            return b""

    async def _take_snapshot(self) -> None:
        """Read every row into memory and decode it (in a thread); none kept when the file
        cannot have one. Decoded here, a restart storm's first AUTH of each key costs a
        dictionary lookup on the loop, not the validation of its row."""
        self._snapshot = None
        if self._header_fd < 0:
            return
        try:
            taken = await asyncio.to_thread(self._read_snapshot)
        except sqlite3.Error as e:
            log.debug("%s: no snapshot of the keys (%s); lookups query the file", self.path, e)
            return
        if taken is not None:
            self._snapshot_stamp, self._snapshot, self._decoded = taken

    def _read_snapshot(self) -> tuple[bytes, dict[str, Row | AccessKey], dict[Row, AccessKey]] | None:
        """In a worker thread: (the header stamp, the first row of each ident, decoded when
        valid; the keys by row), the rows read under one read lock, so no commit falls between
        the two; None in WAL mode or past SNAPSHOT_MAX_ROWS. An invalid row stays a row:
        ``lookup_now`` logs why when its ident asks."""
        taken = self._read_rows()
        if taken is None:
            return None
        stamp, rows = taken
        before = self._decoded  # the loop replaces it only with what this returns
        decoded: dict[Row, AccessKey] = {}
        snapshot: dict[str, Row | AccessKey] = {}
        for ident, row in rows.items():
            key = before.get(row)
            if key is None:
                try:
                    key = row_to_key(row)
                except InvalidKey:
                    snapshot[ident] = row
                    continue
            snapshot[ident] = decoded[row] = key
        return stamp, snapshot, decoded

    def _read_rows(self) -> tuple[bytes, dict[str, Row]] | None:
        """(the header stamp, the first row of each ident), under one read lock."""
        db = sqlite3.connect(self.path, timeout=self.locked_timeout_s, isolation_level=None)
        try:
            db.execute("begin")
            try:
                sql = _DURABLE_SELECT_ALL if has_table(db, "durable_keys") else _SELECT_ALL  # takes the read lock
                stamp = self._stamp()
                if stamp[:2] != _ROLLBACK_JOURNAL or len(stamp) != _STAMP_BYTES:
                    return None
                rows: dict[str, Row] = {}
                for n, row in enumerate(db.execute(sql)):
                    if n >= SNAPSHOT_MAX_ROWS:
                        return None
                    ident = row[0]
                    if isinstance(ident, str) and ident not in rows:
                        rows[ident] = row
                if self._stamp() != stamp:  # cannot change under the read lock; checked all the same
                    return None
                return stamp, rows
            finally:
                db.execute("commit")
        finally:
            db.close()

    def _refresh_lookup_sql(self) -> None:
        conn = self._inline
        if conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            self._lookup_sql = lookup_sql(conn)

    def _data_version(self) -> int | None:
        conn = self._inline
        if conn is None:
            return None
        try:
            return int(conn.execute("pragma data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    def _lookup_waiting(self, ident: str) -> Row | None:
        """In a worker thread: wait up to locked_timeout_s for a writer to finish."""
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._local.conn = sqlite3.connect(self.path, timeout=self.locked_timeout_s)
            row: Row | None = conn.execute(self._lookup_sql, (ident,)).fetchone()
            return row
        except sqlite3.Error as e:
            raise AuthUnavailable(f"{self.description}: {e}") from e

    # --- writer ---------------------------------------------------------------------

    async def open(self, *, create: bool) -> None:
        await asyncio.to_thread(self._open, create)

    def _open(self, create: bool) -> None:
        if not create and not os.path.exists(self.path):
            raise StoreUnavailable(f"{self.path}: no such file (keys add or the broker creates it)")
        with self._errors():
            if create:
                create_private(self.path)  # secrets in plaintext: a new store is 0600
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
            try:
                # Fails here, not later, when the file is not a database.
                db.execute("select count(*) from sqlite_master").fetchone()
                if create:
                    with _transaction(db):
                        ensure_schema(db)
            except BaseException:
                db.close()
                raise
            self._db = db

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as err:
            if _busy(err):
                raise StoreUnavailable(
                    f"{self.path} is locked by another process (waited {self.busy_timeout_s:g} s); try again"
                ) from None
            raise StoreUnavailable(f"{self.path}: {err}") from None
        except sqlite3.DatabaseError as err:
            raise StoreUnavailable(f"{self.path}: {err}") from None
        except OSError as err:
            raise StoreUnavailable(f"{self.path}: {err.strerror or err}") from None

    async def _run(self, work: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        db = self._db
        if db is None:
            raise StoreUnavailable(f"{self.description}: not open")

        def go() -> T:
            with self._errors():
                if not write:
                    return work(db)
                with _transaction(db):
                    ensure_schema(db)
                    return work(db)

        return await asyncio.to_thread(go)

    @staticmethod
    def _rows(
        db: sqlite3.Connection, ident: str | None = None, skip_invalid: SkipInvalid | None = None
    ) -> list[AccessKey]:
        """Valid keys, the first row of each ident; ``InvalidKey`` names the first invalid one (see ``keys``)."""
        if not has_table(db):
            return []
        durable = has_table(db, "durable_keys")
        if ident is None:
            rows = db.execute(_DURABLE_SELECT_ALL if durable else _SELECT_ALL).fetchall()
        else:
            rows = db.execute(DURABLE_LOOKUP_SQL if durable else LOOKUP_SQL, (ident,)).fetchall()
        first: dict[str, AccessKey] = {}
        for row in rows:
            try:
                key = row_to_key(row)
            except InvalidKey as err:
                if skip_invalid is None:
                    raise
                skip_invalid(row[0] if isinstance(row[0], str) else repr(row[0]), err)
                continue
            first.setdefault(key.ident, key)
        return list(first.values())

    @staticmethod
    def _exists(db: sqlite3.Connection, ident: str) -> bool:
        return has_table(db) and db.execute("select 1 from authkeys where ident = ?", (ident,)).fetchone() is not None

    async def keys(self, *, skip_invalid: SkipInvalid | None = None) -> list[AccessKey]:
        return sorted(await self._run(lambda db: self._rows(db, None, skip_invalid)), key=lambda k: k.ident)

    async def get(self, ident: str) -> AccessKey | None:
        found = await self._run(lambda db: self._rows(db, ident))
        return found[0] if found else None

    @staticmethod
    def _set_durable(db: sqlite3.Connection, key: AccessKey) -> None:
        """The key's row in ``durable_keys``; the table is made for the first durable key."""
        if key.durable:
            db.execute(DURABLE_SCHEMA)
            db.execute("insert or ignore into durable_keys (ident) values (?)", (key.ident,))
        elif has_table(db, "durable_keys"):
            db.execute("delete from durable_keys where ident = ?", (key.ident,))

    @classmethod
    def _insert(cls, db: sqlite3.Connection, key: AccessKey) -> None:
        db.execute(
            "insert into authkeys (owner, ident, secret, pubchans, subchans) values (?, ?, ?, ?, ?)",
            (key.owner, key.ident, key.secret, encode_channels(key.pubchans), encode_channels(key.subchans)),
        )
        cls._set_durable(db, key)

    @classmethod
    def _update(cls, db: sqlite3.Connection, key: AccessKey) -> None:
        db.execute(
            "update authkeys set owner = ?, secret = ?, pubchans = ?, subchans = ? where ident = ?",
            (key.owner, key.secret, encode_channels(key.pubchans), encode_channels(key.subchans), key.ident),
        )
        cls._set_durable(db, key)

    async def add(self, key: AccessKey) -> None:
        def work(db: sqlite3.Connection) -> None:
            if self._exists(db, key.ident):
                raise IdentExists(key.ident)
            self._insert(db, key)

        await self._run(work, write=True)

    async def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        def work(db: sqlite3.Connection) -> AccessKey:
            found = self._rows(db, ident)
            if not found:
                raise NoSuchIdent(ident)
            new = change(found[0])
            assert new.ident == ident, "modify must keep the ident"
            self._update(db, new)
            return new

        return await self._run(work, write=True)

    async def remove(self, ident: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            if not self._exists(db, ident):
                raise NoSuchIdent(ident)
            db.execute("delete from authkeys where ident = ?", (ident,))
            if has_table(db, "durable_keys"):
                db.execute("delete from durable_keys where ident = ?", (ident,))

        await self._run(work, write=True)

    async def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        new = list(keys)

        def work(db: sqlite3.Connection) -> int:
            existing = {r[0] for r in db.execute("select distinct ident from authkeys")}
            clash = sorted(k.ident for k in new if k.ident in existing)
            if clash and not replace:
                raise IdentExists(clash)
            for key in new:
                if key.ident in existing:
                    self._update(db, key)
                else:
                    self._insert(db, key)
            return len(new)

        return await self._run(work, write=True)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (``BEGIN IMMEDIATE``: the write lock, waiting up to the busy timeout)."""
    db.execute("begin immediate")
    try:
        yield
    except BaseException:
        db.execute("rollback")
        raise
    db.execute("commit")
