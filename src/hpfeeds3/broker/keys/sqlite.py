"""The sqlite key store: the reference broker's ``sqlite.db``, read and written.

The schema is the reference's, byte for byte, so either broker can open a file
the other made. A new file also gets a unique index on ``ident`` (the
reference's table has none; its lookups are unaffected). An existing file's
schema is never altered.

A running broker reads the same file at every AUTH. Writes take sqlite's write
lock at ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout_s`` for it; beyond
that the command fails with "locked" rather than hanging.

The reference's table does not forbid two rows with one ident; the first row
(lowest id) is the key, as in the reference's lookup. ``modify`` rewrites every
row of the ident and ``remove`` deletes them all, so no stale twin survives.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from ..auth.base import AccessKey, parse_channels
from ..auth.sqlite import REFERENCE_SCHEMA, create_private
from .errors import IdentExists, InvalidKey, NoSuchIdent, StoreUnavailable
from .store import KeyStore

IDENT_INDEX = "create unique index if not exists authkeys_ident on authkeys (ident)"

# How long a write waits for a broker's (or another command's) lock.
BUSY_TIMEOUT_S = 5.0

_SELECT = "select ident, secret, owner, pubchans, subchans from authkeys"


def encode_channels(channels: Iterable[str]) -> str:
    """Channels as the reference stores them: a JSON list in a TEXT column."""
    return json.dumps(list(channels), ensure_ascii=False)


def row_to_key(row: tuple[object, ...], where: str) -> AccessKey:
    ident, secret, owner, pubchans, subchans = row
    try:
        return AccessKey(
            ident=str(ident),
            secret="" if secret is None else str(secret),
            owner="" if owner is None else str(owner),
            pubchans=parse_channels(pubchans),
            subchans=parse_channels(subchans),
        )
    except ValueError:
        raise InvalidKey(
            f"ident {ident!r} in {where}: channels are not a JSON list (pubchans={pubchans!r}, subchans={subchans!r})"
        ) from None


class SqliteKeyStore(KeyStore):
    def __init__(self, path: str, *, create: bool = False, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self.busy_timeout_s = busy_timeout_s
        if not create and not os.path.exists(path):
            raise StoreUnavailable(f"{path}: no such file (keys add or the broker creates it)")
        with self._errors():
            if create:
                create_private(path)  # secrets in plaintext: a new store is 0600
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
            # Fails here, not later, when the file is not a database.
            self._db.execute("select count(*) from sqlite_master").fetchone()
        if create:
            with self._write():
                pass

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as err:
            text = str(err)
            if "locked" in text or "busy" in text:
                raise StoreUnavailable(
                    f"{self.path} is locked by another process (waited {self.busy_timeout_s:g} s); try again"
                ) from None
            raise StoreUnavailable(f"{self.path}: {text}") from None
        except sqlite3.DatabaseError as err:
            raise StoreUnavailable(f"{self.path}: {err}") from None

    def _has_table(self) -> bool:
        row = self._db.execute("select 1 from sqlite_master where type = 'table' and name = 'authkeys'").fetchone()
        return row is not None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; creates the reference tables when missing."""
        with self._errors():
            self._db.execute("begin immediate")
            try:
                if not self._has_table():
                    for statement in REFERENCE_SCHEMA:
                        self._db.execute(statement)
                    self._db.execute(IDENT_INDEX)
                yield self._db
            except BaseException:
                self._db.execute("rollback")
                raise
            self._db.execute("commit")

    def _rows(self, where: str = "", args: tuple[object, ...] = ()) -> list[AccessKey]:
        if not self._has_table():
            return []
        rows = self._db.execute(f"{_SELECT} {where} order by id", args).fetchall()
        first: dict[str, AccessKey] = {}
        for row in rows:
            key = row_to_key(row, self.path)
            first.setdefault(key.ident, key)
        return list(first.values())

    def keys(self) -> list[AccessKey]:
        with self._errors():
            return sorted(self._rows(), key=lambda k: k.ident)

    def get(self, ident: str) -> AccessKey | None:
        with self._errors():
            found = self._rows("where ident = ?", (ident,))
        return found[0] if found else None

    def _insert(self, db: sqlite3.Connection, key: AccessKey) -> None:
        db.execute(
            "insert into authkeys (owner, ident, secret, pubchans, subchans) values (?, ?, ?, ?, ?)",
            (key.owner, key.ident, key.secret, encode_channels(key.pubchans), encode_channels(key.subchans)),
        )

    def _update(self, db: sqlite3.Connection, key: AccessKey) -> None:
        db.execute(
            "update authkeys set owner = ?, secret = ?, pubchans = ?, subchans = ? where ident = ?",
            (key.owner, key.secret, encode_channels(key.pubchans), encode_channels(key.subchans), key.ident),
        )

    def add(self, key: AccessKey) -> None:
        with self._write() as db:
            if self._rows("where ident = ?", (key.ident,)):
                raise IdentExists(key.ident)
            self._insert(db, key)

    def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        with self._write() as db:
            found = self._rows("where ident = ?", (ident,))
            if not found:
                raise NoSuchIdent(ident)
            new = change(found[0])
            assert new.ident == ident, "modify must keep the ident"
            self._update(db, new)
        return new

    def remove(self, ident: str) -> AccessKey:
        with self._write() as db:
            found = self._rows("where ident = ?", (ident,))
            if not found:
                raise NoSuchIdent(ident)
            db.execute("delete from authkeys where ident = ?", (ident,))
        return found[0]

    def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        keys = list(keys)
        with self._write() as db:
            existing = {k.ident for k in self._rows()}
            clash = sorted(k.ident for k in keys if k.ident in existing)
            if clash and not replace:
                raise IdentExists(clash)
            for key in keys:
                if key.ident in existing:
                    self._update(db, key)
                else:
                    self._insert(db, key)
        return len(keys)
