"""The access key the benchmark needs, written for a broker's auth store.

Both formats are the reference broker's, which ours reads too: a JSON file
``{ident: {owner, secret, pubchans, subchans}}``, and the ``authkeys`` table
of an sqlite database (channels as JSON lists in TEXT columns).
"""

from __future__ import annotations

import json
import os
import sqlite3

from ..broker.auth.sqlite import REFERENCE_SCHEMA

SLOTS = 50  # the connect scenario's CHANNEL-0 .. CHANNEL-49


def bench_channels(channel: str = "bench") -> list[str]:
    return [channel] + [f"{channel}-{i}" for i in range(SLOTS)]


def bench_key(ident: str, secret: str, channels: list[str]) -> dict[str, object]:
    return {"owner": ident, "secret": secret, "pubchans": list(channels), "subchans": list(channels)}


def write_json(path: str, ident: str = "bench", secret: str = "bench", channels: list[str] | None = None) -> None:
    """Write (or add to) a users.json holding the benchmark key."""
    users: dict[str, object] = {}
    if os.path.exists(path):
        with open(path) as f:
            users = json.load(f)
    users[ident] = bench_key(ident, secret, channels or bench_channels())
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(users, f, indent=2)
    os.replace(tmp, path)


def write_sqlite(path: str, ident: str = "bench", secret: str = "bench", channels: list[str] | None = None) -> None:
    """Create the reference's tables if missing and put the benchmark key in ``authkeys``."""
    chans = json.dumps(channels or bench_channels())
    db = sqlite3.connect(path)
    try:
        with db:
            for statement in REFERENCE_SCHEMA:
                db.execute(statement)
            db.execute("delete from authkeys where ident = ?", (ident,))
            db.execute(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values (?, ?, ?, ?, ?)",
                (ident, ident, secret, chans, chans),
            )
    finally:
        db.close()
