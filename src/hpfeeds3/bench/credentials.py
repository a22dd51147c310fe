"""The access key the benchmark needs, written for a broker's auth store.

Both formats are the reference broker's, which ours reads too: a JSON file
``{ident: {owner, secret, pubchans, subchans}}``, and the ``authkeys`` table
of an sqlite database (channels as JSON lists in TEXT columns).
"""

from __future__ import annotations

import json
import os
import sqlite3

from ..broker.auth.sqlite import REFERENCE_SCHEMA, ensure_schema

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


# The storm scenarios: sensor i authenticates as ``storm-i`` (its own key,
# publishing and subscribing on channel ``storm-i``) or, sharing one key, as
# ``storm`` on channel ``storm-(i mod STORM_SHARED_CHANNELS)``: enough channels
# that the sensors sharing one see few of each other's messages.
STORM_SHARED_IDENT = "storm"
STORM_SHARED_CHANNELS = 1000


def storm_sensor(i: int, shared: bool) -> tuple[str, str, str]:
    """(ident, secret, channel) of storm sensor ``i``."""
    if shared:
        return STORM_SHARED_IDENT, "storm-secret", f"storm-{i % STORM_SHARED_CHANNELS}"
    return f"storm-{i}", f"storm-secret-{i}", f"storm-{i}"


def storm_keys(sensors: int) -> dict[str, dict[str, object]]:
    """Every key the storm scenarios need for ``sensors`` sensors: one per sensor, and the shared one."""
    keys = {}
    for i in range(sensors):
        ident, secret, channel = storm_sensor(i, shared=False)
        keys[ident] = bench_key(ident, secret, [channel])
    ident, secret, _ = storm_sensor(0, shared=True)
    shared_channels = [storm_sensor(i, shared=True)[2] for i in range(min(sensors, STORM_SHARED_CHANNELS))]
    keys[ident] = bench_key(ident, secret, shared_channels)
    return keys


def write_storm_json(path: str, sensors: int) -> None:
    """Add the storm keys to a users.json."""
    users: dict[str, object] = {}
    if os.path.exists(path):
        with open(path) as f:
            users = json.load(f)
    users.update(storm_keys(sensors))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(users, f)
    os.replace(tmp, path)


def write_storm_sqlite(path: str, sensors: int) -> bool:
    """Put the storm keys into an sqlite auth DB, with the index on ident our
    broker creates (the reference's schema has none, and 10,000 rows scanned
    per AUTH would be the whole figure). Returns False when
    every key was already there: then the file is not written, so a running
    broker sees no change to react to."""
    keys = storm_keys(sensors)
    db = sqlite3.connect(path)
    try:
        with db:
            ensure_schema(db)  # the reference's tables and the index on ident
            rows = db.execute(
                "select ident, secret, pubchans from authkeys where ident = ? or ident like 'storm-%'",
                (STORM_SHARED_IDENT,),
            ).fetchall()
            have = {ident: (secret, json.loads(pubchans or "[]")) for ident, secret, pubchans in rows}
            if len(have) == len(keys) and all(
                have.get(ident) == (k["secret"], k["pubchans"]) for ident, k in keys.items()
            ):
                return False
            db.execute("delete from authkeys where ident = ? or ident like 'storm-%'", (STORM_SHARED_IDENT,))
            db.executemany(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values (?, ?, ?, ?, ?)",
                [
                    (k["owner"], ident, k["secret"], json.dumps(k["pubchans"]), json.dumps(k["subchans"]))
                    for ident, k in keys.items()
                ],
            )
        return True
    finally:
        db.close()
