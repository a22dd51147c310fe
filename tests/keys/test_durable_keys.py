"""Durable keys: the opt-in flag in every store, through ``keys`` and the broker's readers.

A key that is not durable is stored exactly as before (the reference's
columns, no ``durable`` field); the flag lives in a table of its own in
sqlite and PostgreSQL, so the reference broker still reads the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from hpfeeds3.broker.auth.base import AccessKey
from hpfeeds3.broker.auth.env import EnvStore
from hpfeeds3.broker.auth.jsonfile import JsonStore
from hpfeeds3.broker.auth.postgres import PostgresStore
from hpfeeds3.broker.auth.sqlite import SqliteStore
from hpfeeds3.broker.keys import ExitCode, open_store
from tests.broker.test_auth_backends import REFERENCE_READS
from tests.support.postgres import PostgresServer

from .conftest import Result
from .test_migrate import reference_db, schema
from .test_postgres_auth import make_reader_role

Keys = Callable[..., Result]

CHANGE_TIMEOUT_S = 10.0


def key(ident: str, durable: bool = False) -> AccessKey:
    return AccessKey(ident, "s", "", (), ("c",), durable=durable)


def stored(spec: str, ident: str) -> AccessKey | None:
    with open_store(spec) as store:
        return store.get(ident)


async def next_change(changes: AsyncIterator[set[str] | None]) -> set[str] | None:
    return await asyncio.wait_for(anext(changes), CHANGE_TIMEOUT_S)


def test_add_durable_then_turn_it_off_and_on_in_every_store(keys: Keys, store_spec: str) -> None:
    assert keys("add", "col", "--sub", "c", "--durable", "--secret", "s", "--auth", store_spec).code == 0
    assert keys("add", "plain", "--sub", "c", "--secret", "s", "--auth", store_spec).code == 0
    assert stored(store_spec, "col") == key("col", durable=True)
    assert stored(store_spec, "plain") == key("plain")

    r = keys("update", "col", "--no-durable", "--auth", store_spec)
    assert r.code == 0 and "durable:  no" in r.out
    assert stored(store_spec, "col") == key("col")
    r = keys("update", "col", "--durable", "--auth", store_spec)
    assert r.code == 0 and "durable:  yes" in r.out
    assert stored(store_spec, "col") == key("col", durable=True)
    # other changes keep the flag
    assert keys("grant", "col", "--sub", "d", "--auth", store_spec).code == 0
    assert keys("rotate", "col", "--secret", "t", "--auth", store_spec).code == 0
    assert stored(store_spec, "col") == AccessKey("col", "t", "", (), ("c", "d"), durable=True)

    r = keys("show", "col", "--json", "--auth", store_spec)
    assert json.loads(r.out)["durable"] is True
    # a removed key leaves no flag behind for a new key of the same ident
    assert keys("remove", "col", "--auth", store_spec).code == 0
    assert keys("add", "col", "--sub", "c", "--secret", "s", "--auth", store_spec).code == 0
    assert stored(store_spec, "col") == key("col")


def test_update_without_a_change_names_durable(keys: Keys, tmp_path: Path) -> None:
    spec = str(tmp_path / "keys.json")
    assert keys("add", "col", "--secret", "s", "--auth", spec).code == 0
    r = keys("update", "col", "--auth", spec)
    assert r.code == ExitCode.BAD_ARGUMENTS and "--durable" in r.err


def test_export_import_and_copy_keep_the_flag(keys: Keys, tmp_path: Path, postgres_dsn: str) -> None:
    sqlite_spec = f"sqlite:{tmp_path / 'a.db'}"
    assert keys("add", "col", "--sub", "c", "--durable", "--secret", "s", "--auth", sqlite_spec).code == 0
    assert keys("add", "plain", "--sub", "c", "--secret", "s", "--auth", sqlite_spec).code == 0
    r = keys("export", "--auth", sqlite_spec)
    doc = json.loads(r.out)
    assert doc["col"]["durable"] is True
    assert "durable" not in doc["plain"]  # a key that is not durable is written as before
    json_spec = str(tmp_path / "b.json")
    assert keys("import", "-", "--auth", json_spec, stdin=r.out).code == 0
    assert keys("copy", "--from", json_spec, "--to", postgres_dsn).code == 0
    assert keys("copy", "--from", postgres_dsn, "--to", f"sqlite:{tmp_path / 'c.db'}").code == 0
    for spec in (json_spec, postgres_dsn, f"sqlite:{tmp_path / 'c.db'}"):
        assert stored(spec, "col") == key("col", durable=True), spec
        assert stored(spec, "plain") == key("plain"), spec


def test_json_durable_must_be_a_boolean(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "yes": {"secret": "s", "subchans": ["c"], "durable": True},
                "no": {"secret": "s", "subchans": ["c"]},
                "bad": {"secret": "s", "subchans": ["c"], "durable": "yes"},
            }
        )
    )

    async def go() -> None:
        store = JsonStore(str(path))
        await store.start()
        try:
            assert await store.lookup("yes") == key("yes", durable=True)
            assert await store.lookup("no") == key("no")
            assert await store.lookup("bad") is None  # not a valid key: "no such key", logged
        finally:
            await store.close()

    asyncio.run(go())


def test_json_store_reports_a_flag_change_as_a_changed_ident(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"col": {"secret": "s", "subchans": ["c"]}}))
    store = JsonStore(str(path))
    store._keys = store._read_serving()
    path.write_text(json.dumps({"col": {"secret": "s", "subchans": ["c"], "durable": True}}))
    assert store.reload() == {"col"}
    assert store.lookup_now("col") == key("col", durable=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False), ("", False), (None, False)],
)
def test_env_durable_variable(value: str | None, expected: bool) -> None:
    environ = {"HPFEEDS_COL_SECRET": "s", "HPFEEDS_COL_SUBCHANS": "c", "HPFEEDS_COL_OWNER": ""}
    if value is not None:
        environ["HPFEEDS_COL_DURABLE"] = value
    assert EnvStore(environ).lookup_now("col") == key("col", durable=expected)


def test_env_durable_that_is_not_a_boolean_is_no_such_key() -> None:
    environ = {"HPFEEDS_COL_SECRET": "s", "HPFEEDS_COL_DURABLE": "sometimes"}
    assert EnvStore(environ).lookup_now("col") is None


def test_reference_broker_reads_a_sqlite_db_holding_durable_keys(keys: Keys, tmp_path: Path) -> None:
    from tests.support.reference import run_reference_python

    db = reference_db(tmp_path / "sqlite.db")
    before = [row for row in schema(db) if row[0] in ("authkeys", "logs", "stats")]
    spec = f"sqlite:{db}"
    assert keys("add", "durable-col", "--sub", "c", "--durable", "--secret", "s", "--auth", spec).code == 0
    assert keys("update", "collector", "--durable", "--auth", spec).code == 0
    # the reference's tables are as they were: the flag is in durable_keys
    assert [row for row in schema(db) if row[0] in ("authkeys", "logs", "stats")] == before
    r = run_reference_python(REFERENCE_READS, [str(db), "durable-col", "collector"])
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads(r.stdout)
    assert got[0] == {"owner": "", "ident": "durable-col", "secret": "s", "pubchans": [], "subchans": ["c"]}
    assert got[1]["ident"] == "collector" and got[1]["secret"] == "c-secret"
    assert stored(spec, "collector").durable  # type: ignore[union-attr]


def test_sqlite_reader_sees_the_flag_and_its_change_feed_reports_it(keys: Keys, tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")  # no durable_keys yet
    spec = f"sqlite:{db}"

    async def go() -> None:
        store = SqliteStore(str(db), poll_s=0.05)
        await store.start()
        changes = store.changes()
        try:
            found = await store.lookup("collector")
            assert found is not None and not found.durable
            pending = asyncio.ensure_future(next_change(changes))
            for _ in range(100):  # the feed took its baseline and waits for the next poll
                if changes.ag_await is not None:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0)
            assert changes.ag_await is not None  # type: ignore[attr-defined]
            # the first durable key makes durable_keys while the broker reads the file
            assert (await asyncio.to_thread(keys, "update", "collector", "--durable", "--auth", spec)).code == 0
            assert await pending is None  # "recheck every live ident"
            found = store.lookup_now("collector")
            assert found is not None and found.durable
            # a write the change feed has not seen yet: the lookup queries the file, durable_keys too
            with contextlib.closing(sqlite3.connect(db)) as other, other:
                other.execute(
                    "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('o', 'x', 's', '[]', '[]')"
                )
            found = store.lookup_now("collector")
            assert found is not None and found.durable
            assert (await asyncio.to_thread(keys, "update", "collector", "--no-durable", "--auth", spec)).code == 0
            assert await next_change(changes) is None
            found = store.lookup_now("collector")
            assert found is not None and not found.durable
        finally:
            await changes.aclose()  # type: ignore[attr-defined]
            await store.close()

    asyncio.run(go())


def test_sqlite_flag_written_by_plain_sql_is_read(tmp_path: Path) -> None:
    db = reference_db(tmp_path / "sqlite.db")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("create table durable_keys (ident TEXT primary key not null)")
        conn.execute("insert into durable_keys (ident) values ('collector')")
    conn.close()

    async def go() -> None:
        store = SqliteStore(str(db))
        await store.start()
        try:
            found = await store.lookup("collector")
            assert found is not None and found.durable
            other = await store.lookup("empty")
            assert other is not None and not other.durable
        finally:
            await store.close()

    asyncio.run(go())


def test_postgres_flag_change_is_notified_with_its_ident(keys: Keys, postgres_dsn: str) -> None:
    assert keys("add", "col", "--sub", "c", "--secret", "s", "--auth", postgres_dsn).code == 0

    async def go() -> None:
        store = PostgresStore(postgres_dsn)
        await store.start()
        changes = store.changes()
        try:
            assert await store.lookup("col") == key("col")
            pending = asyncio.ensure_future(next_change(changes))
            await asyncio.sleep(0.3)  # the listener is connected
            assert (await asyncio.to_thread(keys, "update", "col", "--durable", "--auth", postgres_dsn)).code == 0
            assert await pending == {"col"}
            assert await store.lookup("col") == key("col", durable=True)
            # a flag set by plain SQL notifies too
            conn = await asyncpg.connect(postgres_dsn)
            try:
                await conn.execute("DELETE FROM durable_keys WHERE ident = 'col'")
            finally:
                await conn.close()
            assert await next_change(changes) == {"col"}
            assert await store.lookup("col") == key("col")
        finally:
            await changes.aclose()  # type: ignore[attr-defined]
            await store.close()

    asyncio.run(go())


def test_postgres_role_that_cannot_read_durable_keys_is_served_without_them(
    keys: Keys, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = postgres_server.new_database()
    database = dsn.rsplit("/", 1)[1]
    make_reader_role(postgres_server)
    assert keys("add", "col", "--sub", "c", "--durable", "--secret", "s", "--auth", dsn).code == 0
    postgres_server.psql("GRANT SELECT ON authkeys TO hpfeeds_reader", database)
    reader_dsn = f"postgresql://hpfeeds_reader@127.0.0.1:{postgres_server.port}/{database}"

    async def go() -> None:
        store = PostgresStore(reader_dsn)
        await store.start()
        try:
            assert await store.lookup("col") == key("col")  # served, not durable
        finally:
            await store.close()
        postgres_server.psql("GRANT SELECT ON durable_keys TO hpfeeds_reader", database)
        store = PostgresStore(reader_dsn)
        await store.start()
        try:
            assert await store.lookup("col") == key("col", durable=True)
        finally:
            await store.close()

    asyncio.run(go())
    assert "cannot read durable_keys" in caplog.text


def test_postgres_database_made_before_durable_keys_gets_the_table_at_start(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.new_database()
    database = dsn.rsplit("/", 1)[1]
    postgres_server.psql(
        "CREATE TABLE authkeys (id serial PRIMARY KEY, owner TEXT, ident TEXT, secret TEXT, pubchans TEXT,"
        " subchans TEXT); INSERT INTO authkeys (owner, ident, secret, pubchans, subchans)"
        " VALUES ('', 'col', 's', '[]', '[\"c\"]');",
        database,
    )

    async def go() -> None:
        store = PostgresStore(dsn)
        await store.start()  # as the owner: durable_keys and its trigger are made
        try:
            assert await store.lookup("col") == key("col")
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("INSERT INTO durable_keys (ident) VALUES ('col')")
            finally:
                await conn.close()
            assert await store.lookup("col") == key("col", durable=True)
        finally:
            await store.close()

    asyncio.run(go())
