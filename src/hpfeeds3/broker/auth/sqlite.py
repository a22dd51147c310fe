"""The embedded default: the reference broker's ``authkeys`` table in sqlite.

Schema-compatible with the reference, so its ``sqlite.db`` opens unchanged and
rows inserted with the ``sqlite3`` shell take effect for the next connection.

A lookup first runs inline with no busy wait (microseconds on a small table);
only when a writer holds the lock does it move to a thread that retries for a
bounded time, so the event loop is never blocked for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator

from ..config import ConfigError
from .base import AccessKey, AuthUnavailable, WouldBlock, parse_channels

log = logging.getLogger("hpfeeds3.broker.auth.sqlite")

# The reference broker's tables, exactly as it creates them; created when
# missing (logs/stats are unused but kept so the reference broker can open a
# file we created). The key tools and the benchmark use the same statements.
REFERENCE_SCHEMA = (
    "create table if not exists logs (id integer primary key autoincrement, data TEXT)",
    "create table if not exists stats (id integer primary key autoincrement, ak TEXT, uid TEXT, data TEXT)",
    "create table if not exists authkeys (id integer primary key autoincrement,"
    " owner TEXT, ident TEXT, secret TEXT, pubchans TEXT, subchans TEXT)",
)

LOOKUP_SQL = "select owner, ident, secret, pubchans, subchans from authkeys where ident = ?"


def create_private(path: str) -> None:
    """Create ``path`` empty and readable by its owner only, unless it exists.

    The store holds secrets in plaintext (the protocol needs them), so a new
    one is mode 0600; sqlite gives its journal files the same mode. An
    existing file is left as its owner set it.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def ensure_schema(path: str) -> None:
    """Create the reference tables when missing; raise ConfigError if the file is unusable."""
    try:
        create_private(path)
    except OSError as e:
        raise ConfigError(f"cannot open sqlite auth database {path!r}: {e.strerror}") from e
    try:
        conn = sqlite3.connect(path, timeout=5.0)
        try:
            with conn:
                for stmt in REFERENCE_SCHEMA:
                    conn.execute(stmt)
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise ConfigError(f"cannot open sqlite auth database {path!r}: {e}") from e


def row_to_key(row: tuple[str, str, str, str, str]) -> AccessKey:
    owner, ident, secret, pubchans, subchans = row
    return AccessKey(
        ident=ident,
        secret=secret or "",
        owner=owner or "",
        pubchans=parse_channels(pubchans),
        subchans=parse_channels(subchans),
    )


class SqliteAuthenticator:
    def __init__(self, path: str = "sqlite.db", *, locked_timeout_s: float = 2.0, poll_s: float = 1.0) -> None:
        self.path = path
        self.locked_timeout_s = locked_timeout_s
        self.poll_s = poll_s
        self._inline: sqlite3.Connection | None = None
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"sqlite:{self.path}"

    async def start(self) -> None:
        if os.path.isdir(self.path):
            raise ConfigError(f"sqlite auth database {self.path!r} is a directory")
        ensure_schema(self.path)
        # timeout=0: never wait inline for a writer's lock; fall back to a thread.
        self._inline = sqlite3.connect(self.path, timeout=0, check_same_thread=False, isolation_level=None)

    async def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    async def lookup(self, ident: str) -> AccessKey | None:
        try:
            return self.lookup_now(ident)
        except WouldBlock:
            return self._to_key(await asyncio.to_thread(self._lookup_waiting, ident), ident)

    def lookup_now(self, ident: str) -> AccessKey | None:
        """The inline query; ``WouldBlock`` while a writer holds the lock."""
        conn = self._inline
        if conn is None:
            raise AuthUnavailable("sqlite authenticator is not started")
        try:
            row = conn.execute(LOOKUP_SQL, (ident,)).fetchone()
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise WouldBlock from e
            raise AuthUnavailable(f"sqlite: {e}") from e
        except sqlite3.Error as e:
            raise AuthUnavailable(f"sqlite: {e}") from e
        return self._to_key(row, ident)

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """Yield ``None`` (recheck every live ident) after another process commits.

        ``PRAGMA data_version`` changes when any other connection commits: one
        cheap query per poll, whatever the table size.
        """
        last = self._data_version()  # the baseline, before the first wait
        while self._inline is not None:
            await asyncio.sleep(self.poll_s)
            version = self._data_version()
            if version is None:
                continue  # locked or briefly unavailable: try at the next poll
            if last is not None and version != last:
                yield None
            last = version

    def _data_version(self) -> int | None:
        conn = self._inline
        if conn is None:
            return None
        try:
            return int(conn.execute("pragma data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    def _lookup_waiting(self, ident: str) -> tuple[str, str, str, str, str] | None:
        """In a worker thread: wait up to locked_timeout_s for a writer to finish."""
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._local.conn = sqlite3.connect(self.path, timeout=self.locked_timeout_s)
            return conn.execute(LOOKUP_SQL, (ident,)).fetchone()
        except sqlite3.Error as e:
            raise AuthUnavailable(f"sqlite: {e}") from e

    def _to_key(self, row: tuple[str, str, str, str, str] | None, ident: str) -> AccessKey | None:
        if row is None:
            return None
        try:
            return row_to_key(row)
        except (ValueError, TypeError) as e:
            log.error("authkeys row for %r has malformed channels: %s", ident, e)
            raise AuthUnavailable(f"malformed key for {ident!r}") from e
