"""Import, export and copy between stores; the reference broker's files as they are."""

from __future__ import annotations

import json
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hpfeeds3.broker.auth.base import AccessKey
from hpfeeds3.broker.auth.sqlite import SqliteStore
from hpfeeds3.broker.keys import ExitCode, StoreUnavailable, open_store
from hpfeeds3.broker.keys.blocking import open_writer

from .conftest import Result

Keys = Callable[..., Result]

# The reference broker's own statements (hpfeeds 3.1.0, broker/auth/sqlite.py).
REFERENCE_SQL = [
    "create table authkeys (id integer primary key autoincrement, "
    "owner TEXT, ident TEXT, secret TEXT, pubchans TEXT, subchans TEXT)",
    "create table logs (id integer primary key autoincrement, data TEXT)",
    "create table stats (id integer primary key autoincrement, ak TEXT, uid TEXT, data TEXT)",
]

KEYS = [
    AccessKey("collector", "c-secret", "bob", (), ("cowrie.sessions", "dionaea.capture")),
    AccessKey("sensor-é", "s-secret", "alice", ("cowrie.sessions", "chan with spaces.*>"), ()),
    AccessKey("empty", "e-secret", "", (), ()),
]


def reference_db(path: Path) -> Path:
    db = sqlite3.connect(path)
    for statement in REFERENCE_SQL:
        db.execute(statement)
    db.executemany(
        "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) VALUES (?, ?, ?, ?, ?)",
        [(k.owner, k.ident, k.secret, json.dumps(list(k.pubchans)), json.dumps(list(k.subchans))) for k in KEYS],
    )
    db.commit()
    db.close()
    return path


def schema(path: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("select name, sql from sqlite_master").fetchall())
    finally:
        db.close()


def all_keys(spec: str) -> list[AccessKey]:
    with open_store(spec) as store:
        return store.keys()


def test_round_trip_sqlite_json_postgres_sqlite_keeps_every_key(keys: Keys, tmp_path: Path, postgres_dsn: str) -> None:
    old = reference_db(tmp_path / "old.db")
    dump = tmp_path / "keys.json"
    new = tmp_path / "new.db"
    assert keys("export", "--auth", f"sqlite:{old}", "--to", str(dump)).code == 0
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert keys("import", str(dump), "--auth", postgres_dsn).code == 0
    assert keys("copy", "--from", postgres_dsn, "--to", f"sqlite:{new}").code == 0
    expected = sorted(KEYS, key=lambda k: k.ident)
    assert all_keys(f"sqlite:{old}") == expected
    assert all_keys(postgres_dsn) == expected
    assert all_keys(f"sqlite:{new}") == expected
    # and the file we made has the reference's tables, so the reference broker opens it
    tables = {name for name, _ in schema(new)}
    assert {"authkeys", "logs", "stats"} <= tables


INDEX = ("authkeys_ident", "CREATE INDEX authkeys_ident on authkeys (ident)")
# The durable flags: a table of their own, beside the reference's.
DURABLE_TABLE = [
    ("durable_keys", "CREATE TABLE durable_keys (ident TEXT primary key not null)"),
    ("sqlite_autoindex_durable_keys_1", None),
]


def test_reference_sqlite_db_is_read_and_written_without_table_change(keys: Keys, tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")
    before = schema(db)
    spec = f"sqlite:{db}"
    r = keys("list", "--auth", spec)
    assert r.code == 0 and "collector" in r.out and "sensor-é" in r.out
    assert schema(db) == before  # reading changes nothing
    assert keys("grant", "collector", "--sub", "new.chan", "--auth", spec).code == 0
    assert keys("add", "fresh", "--secret", "x", "--pub", "a", "--auth", spec).code == 0
    # the tables are the reference's still; a write adds only the index on ident
    assert schema(db) == sorted([*before, INDEX])
    # the first durable key adds a table of its own
    assert keys("update", "fresh", "--durable", "--auth", spec).code == 0
    assert schema(db) == sorted([*before, INDEX, *DURABLE_TABLE])
    # rows are in the reference's encoding: JSON lists in TEXT columns
    conn = sqlite3.connect(db)
    row = conn.execute("select owner, secret, pubchans, subchans from authkeys where ident = 'fresh'").fetchone()
    conn.close()
    assert row == ("", "x", '["a"]', "[]")


def test_reference_rows_with_nulls_and_duplicate_idents(keys: Keys, tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")
    conn = sqlite3.connect(db)
    conn.execute("insert into authkeys (ident, secret) values ('nulls', 'n')")
    conn.execute("insert into authkeys (ident, secret, pubchans, subchans) values ('empty', 'twin', '[]', '[]')")
    conn.commit()
    conn.close()
    spec = f"sqlite:{db}"
    with open_store(spec) as store:
        assert store.get("nulls") == AccessKey("nulls", "n", "", (), ())
        assert store.get("empty") == KEYS[2]  # the first row wins, as in the reference
    # rotating rewrites every row of the ident; removing deletes them all
    assert keys("rotate", "empty", "--secret", "new", "--auth", spec).code == 0
    conn = sqlite3.connect(db)
    assert conn.execute("select secret from authkeys where ident = 'empty'").fetchall() == [("new",), ("new",)]
    conn.close()
    assert keys("remove", "empty", "--auth", spec).code == 0
    assert keys("show", "empty", "--auth", spec).code == ExitCode.NO_SUCH_IDENT


def test_reference_sqlite_db_is_accepted_by_path_on_import(keys: Keys, tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")
    target = tmp_path / "keys.json"
    assert keys("import", str(db), "--auth", str(target)).code == 0
    assert all_keys(str(target)) == sorted(KEYS, key=lambda k: k.ident)


MONGO_DOCS = [
    {"_id": {"$oid": "5a0c4b1f"}, "identifier": "mnemosyne", "secret": "m1", "publish": [],
     "subscribe": ["dionaea.capture", "cowrie.sessions"]},
    {"_id": {"$oid": "5a0c4b20"}, "identifier": "cowrie-1", "secret": "c1", "owner": "chn",
     "publish": ["cowrie.sessions"], "subscribe": []},
]  # fmt: skip
MONGO_KEYS = [
    AccessKey("cowrie-1", "c1", "chn", ("cowrie.sessions",), ()),
    AccessKey("mnemosyne", "m1", "", (), ("dionaea.capture", "cowrie.sessions")),
]


@pytest.mark.parametrize("form", ["array", "lines"])
def test_import_accepts_mongodb_era_field_names(keys: Keys, tmp_path: Path, form: str) -> None:
    path = tmp_path / "mongo.json"
    if form == "array":
        path.write_text(json.dumps(MONGO_DOCS))
    else:  # mongoexport's default: one object per line
        path.write_text("\n".join(json.dumps(d) for d in MONGO_DOCS) + "\n")
    spec = f"sqlite:{tmp_path / 'k.db'}"
    r = keys("import", str(path), "--auth", spec)
    assert r.code == 0, r.err
    assert all_keys(spec) == MONGO_KEYS


def test_import_from_stdin(keys: Keys, tmp_path: Path) -> None:
    spec = str(tmp_path / "k.json")
    doc = {"a": {"secret": "s", "pubchans": ["x"], "subchans": []}}
    assert keys("import", "-", "--auth", spec, stdin=json.dumps(doc)).code == 0
    assert all_keys(spec) == [AccessKey("a", "s", "", ("x",), ())]


def test_import_refuses_existing_idents_unless_replace(keys: Keys, store_spec: str, tmp_path: Path) -> None:
    keys("add", "cowrie-1", "--secret", "old", "--auth", store_spec)
    keys("add", "other", "--secret", "keep", "--auth", store_spec)
    path = tmp_path / "mongo.json"
    path.write_text(json.dumps(MONGO_DOCS))
    r = keys("import", str(path), "--auth", store_spec)
    assert r.code == ExitCode.IDENT_EXISTS and "cowrie-1" in r.err
    with open_store(store_spec) as store:  # all or nothing
        assert store.get("mnemosyne") is None
    assert keys("import", str(path), "--replace", "--auth", store_spec).code == 0
    assert {k.ident: k.secret for k in all_keys(store_spec)} == {"cowrie-1": "c1", "mnemosyne": "m1", "other": "keep"}


@pytest.mark.parametrize(
    ("content", "code"),
    [
        ("{not json", ExitCode.BAD_ARGUMENTS),
        ('"a string"', ExitCode.BAD_ARGUMENTS),
        ('[{"identifier": "a"}]', ExitCode.INVALID_KEY),  # no secret
        ('[{"secret": "s"}]', ExitCode.INVALID_KEY),  # no ident
        ('{"a": {"secret": "s", "pubchans": [""]}}', ExitCode.INVALID_KEY),
        ('{"a": {"secret": "s", "pubchans": "chan"}}', ExitCode.INVALID_KEY),
        ('[{"ident": "a", "secret": "s"}, {"identifier": "a", "secret": "t"}]', ExitCode.INVALID_KEY),
    ],
)
def test_import_rejects_bad_files_with_one_line(keys: Keys, tmp_path: Path, content: str, code: int) -> None:
    path = tmp_path / "in.json"
    path.write_text(content)
    r = keys("import", str(path), "--auth", f"sqlite:{tmp_path / 'k.db'}")
    assert r.code == code, r.err
    assert r.err.count("\n") == 1


def test_import_of_a_missing_file_is_bad_arguments(keys: Keys, tmp_path: Path) -> None:
    r = keys("import", str(tmp_path / "nope.json"), "--auth", f"sqlite:{tmp_path / 'k.db'}")
    assert r.code == ExitCode.BAD_ARGUMENTS


def test_export_to_stdout_is_our_json_format(keys: Keys, tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")
    r = keys("export", "--auth", f"sqlite:{db}")
    assert r.code == 0
    doc = json.loads(r.out)
    assert list(doc) == sorted(k.ident for k in KEYS)
    assert doc["collector"] == {
        "owner": "bob",
        "secret": "c-secret",
        "pubchans": [],
        "subchans": ["cowrie.sessions", "dionaea.capture"],
    }


def test_writer_waits_for_a_reader_and_reports_a_lock_it_cannot_get(tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")
    # A broker-like reader holding a read transaction briefly: the write waits, then succeeds.
    reader = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    reader.execute("begin")
    reader.execute("select * from authkeys").fetchall()
    timer = threading.Timer(0.3, lambda: reader.execute("commit"))
    timer.start()
    try:
        with open_writer(SqliteStore(str(db), busy_timeout_s=5.0)) as store:
            store.remove("empty")
    finally:
        timer.join()
        reader.close()
    # A lock held beyond the busy timeout: a clear error, in bounded time.
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("begin exclusive")
    try:
        start = time.monotonic()
        with (
            pytest.raises(StoreUnavailable, match="locked"),
            open_writer(SqliteStore(str(db), busy_timeout_s=0.3)) as store,
        ):
            store.remove("collector")
        assert time.monotonic() - start < 3
    finally:
        holder.execute("rollback")
        holder.close()


def test_a_row_that_is_not_a_valid_key_is_named_and_can_be_removed(keys: Keys, tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('o', 'bad', NULL, '[]', '[]')"
        )
    conn.close()
    spec = f"sqlite:{db}"
    r = keys("show", "bad", "--auth", spec)
    assert r.code == ExitCode.INVALID_KEY and "'bad'" in r.err and "secret" in r.err
    r = keys("list", "--auth", spec)  # the valid keys, and the invalid one named
    assert r.code == 0 and "collector" in r.out and "bad" not in r.out and "'bad'" in r.err, r
    assert keys("remove", "bad", "--auth", spec).code == 0
    r = keys("list", "--auth", spec)
    assert (r.code, r.err) == (0, ""), r
