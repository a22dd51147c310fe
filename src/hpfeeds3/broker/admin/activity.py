"""The console's activity history on disk: what survives a restart of the broker.

Kept in ``DATA_DIR/console/activity.db`` (sqlite; ``--data-dir``), per ident:
when it was last seen, when it last published, its refused publishes, failed
logins and slow-consumer cuts with the last reason; per (ident, channel): the last publish;
per ident and per channel: message counts per minute for the last 24 hours.

The tracker (``tracker.py``) keeps the same in memory and marks what changed;
every poll it hands the changes to ``ActivityStore.write`` as one batch, run
on the store's own thread (one transaction), never on the event loop. The
file is read once, on the same thread, when the console starts.

Bounds (the memory's and so the file's): ``tracker.MAX_IDENTS`` idents,
``tracker.MAX_PAIRS`` (ident, channel) pairs, and per-minute history for at
most ``MAX_HISTORY`` idents and ``MAX_HISTORY`` channels (the least recently
active go first), each at most ``DAY`` minutes: at most 2 x 1,000 x 1,440
minute rows, and minutes older than a day are deleted at every write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from array import array
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("hpfeeds3.broker.admin")

# Minutes of history kept per ident and per channel.
DAY = 1_440
# Idents, and channels, whose per-minute history is kept.
MAX_HISTORY = 1_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS idents (
    ident TEXT PRIMARY KEY, last_seen REAL, last_publish REAL,
    refused INTEGER NOT NULL DEFAULT 0, refused_reason TEXT, refused_at REAL,
    failed INTEGER NOT NULL DEFAULT 0, failed_reason TEXT, failed_at REAL,
    cut INTEGER NOT NULL DEFAULT 0, cut_reason TEXT, cut_at REAL
);
CREATE TABLE IF NOT EXISTS pairs (ident TEXT, channel TEXT, last_publish REAL, PRIMARY KEY (ident, channel));
CREATE TABLE IF NOT EXISTS minutes (
    kind TEXT, name TEXT, minute INTEGER, count INTEGER, PRIMARY KEY (kind, name, minute)
);
CREATE INDEX IF NOT EXISTS minutes_by_minute ON minutes (minute);
"""
# Columns added to ``idents`` since its first version (a file written before gets them at open).
ADDED_COLUMNS = (("cut", "INTEGER NOT NULL DEFAULT 0"), ("cut_reason", "TEXT"), ("cut_at", "REAL"))
IDENT_COLUMNS = (
    "ident, last_seen, last_publish, refused, refused_reason, refused_at, failed, failed_reason, failed_at,"
    " cut, cut_reason, cut_at"
)


class History:
    """Messages per minute over the last ``DAY`` minutes: a ring of two arrays (11 KiB)."""

    __slots__ = ("counts", "last_publish", "minutes")

    def __init__(self) -> None:
        self.minutes = array("i", [-1]) * DAY
        self.counts = array("q", [0]) * DAY
        self.last_publish = 0.0

    def add(self, minute: int, count: int) -> None:
        i = minute % DAY
        if self.minutes[i] != minute:
            self.minutes[i] = minute
            self.counts[i] = 0
        self.counts[i] += count

    def at(self, minute: int) -> int:
        i = minute % DAY
        return self.counts[i] if self.minutes[i] == minute else 0

    def series(self, last: int, n: int) -> list[int]:
        """Counts of the ``n`` minutes ending with ``last``, oldest first."""
        return [self.at(m) for m in range(last - n + 1, last + 1)]

    def windows(self, minute: int) -> tuple[int, int]:
        """Messages in the last 5 minutes and the last hour (this minute included)."""
        hour = self.series(minute, 60)
        return sum(hour[-5:]), sum(hour)


@dataclass(slots=True)
class Trouble:
    """Why an ident may send (or get) nothing: refused publishes, failed logins and
    slow-consumer cuts, with the last reason."""

    refused: int = 0
    refused_reason: str | None = None
    refused_at: float | None = None
    failed: int = 0
    failed_reason: str | None = None
    failed_at: float | None = None
    cut: int = 0
    cut_reason: str | None = None
    cut_at: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "refused": self.refused,
            "refused_reason": self.refused_reason,
            "refused_at": self.refused_at,
            "failed_logins": self.failed,
            "failed_reason": self.failed_reason,
            "failed_at": self.failed_at,
            "cuts": self.cut,
            "cut_reason": self.cut_reason,
            "cut_at": self.cut_at,
        }


@dataclass(slots=True)
class Batch:
    """What changed since the last write."""

    idents: list[tuple[Any, ...]] = field(default_factory=list)  # rows of the idents table
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    minutes: list[tuple[str, str, int, int]] = field(default_factory=list)  # (kind, name, minute, count)
    forget_idents: list[str] = field(default_factory=list)
    forget_history: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    forget_pairs: list[tuple[str, str]] = field(default_factory=list)
    oldest_minute: int = 0

    def __bool__(self) -> bool:
        return bool(
            self.idents or self.pairs or self.minutes or self.forget_idents or self.forget_history or self.forget_pairs
        )


@dataclass(slots=True)
class Loaded:
    idents: list[tuple[Any, ...]]
    pairs: list[tuple[str, str, float]]
    minutes: list[tuple[str, str, int, int]]


class ActivityStore:
    """The sqlite file; every method runs on one thread of its own (``Tracker`` calls it there)."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, "console", "activity.db")
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(idents)")}
            for name, kind in ADDED_COLUMNS:
                if name not in present:
                    db.execute(f"ALTER TABLE idents ADD COLUMN {name} {kind}")
            self._db = db
        return self._db

    def load(self, oldest_minute: int) -> Loaded:
        db = self._open()
        return Loaded(
            idents=db.execute(
                f"SELECT {IDENT_COLUMNS} FROM idents ORDER BY max(coalesce(last_seen, 0), coalesce(last_publish, 0))"
            ).fetchall(),
            pairs=db.execute("SELECT ident, channel, last_publish FROM pairs ORDER BY last_publish").fetchall(),
            minutes=db.execute(
                "SELECT kind, name, minute, count FROM minutes WHERE minute >= ?", (oldest_minute,)
            ).fetchall(),
        )

    def write(self, batch: Batch) -> None:
        db = self._open()
        with contextlib.closing(db.cursor()) as cur:
            cur.execute("BEGIN")
            try:
                # Forgotten first: a name dropped and met again since starts afresh.
                cur.executemany("DELETE FROM idents WHERE ident = ?", [(i,) for i in batch.forget_idents])
                cur.executemany("DELETE FROM pairs WHERE ident = ? AND channel = ?", batch.forget_pairs)
                cur.executemany("DELETE FROM minutes WHERE kind = ? AND name = ?", batch.forget_history)
                cur.execute("DELETE FROM minutes WHERE minute < ?", (batch.oldest_minute,))
                cur.executemany(
                    f"INSERT OR REPLACE INTO idents ({IDENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    batch.idents,
                )
                cur.executemany("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?)", batch.pairs)
                cur.executemany("INSERT OR REPLACE INTO minutes VALUES (?, ?, ?, ?)", batch.minutes)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
