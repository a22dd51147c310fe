"""PostgresStore against a real PostgreSQL: lookups, the database going
away and coming back, and change notification.

The outage tests stop and restart a server of their own, so the session
server the other tests share is never disturbed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from hpfeeds3.broker.auth.base import AccessKey, AuthUnavailable
from hpfeeds3.broker.auth.postgres import PostgresStore
from hpfeeds3.broker.config import ConfigError
from hpfeeds3.broker.keys import ExitCode, open_store
from tests.support.postgres import PostgresServer

KEY = AccessKey("sensor1", "s3cret", "alice", ("cowrie.sessions",), ("ctl",))


def add(dsn: str, key: AccessKey = KEY) -> None:
    with open_store(dsn, create=True) as store:
        store.add(key)


async def next_change(changes: AsyncIterator[set[str] | None], timeout_s: float = 5.0) -> set[str] | None:
    return await asyncio.wait_for(anext(changes), timeout_s)


async def listening(dsn: str, timeout_s: float = 10.0) -> None:
    """Instead of sleeping: until a session of this database has run its LISTEN (as the server shows it)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN %'"
        while not await conn.fetchval(query):
            assert time.monotonic() < deadline, "nothing LISTENs"
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


def make_reader_role(server: PostgresServer) -> None:
    """The role ``hpfeeds_reader`` (LOGIN, no grants of its own), once per server."""
    server.psql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hpfeeds_reader') THEN "
        "CREATE ROLE hpfeeds_reader LOGIN; END IF; END $$;"
    )


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start_new()
    try:
        yield server
    finally:
        server.destroy()


def test_lookup_finds_keys_and_returns_none_for_unknown(postgres_dsn: str) -> None:
    async def go() -> None:
        auth = PostgresStore(postgres_dsn)
        await auth.start()  # creates the table
        try:
            assert await auth.lookup("sensor1") is None
            await asyncio.to_thread(add, postgres_dsn)
            assert await auth.lookup("sensor1") == KEY
            # a row written by plain SQL, as an operator might
            conn = await asyncpg.connect(postgres_dsn)
            await conn.execute(
                "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans)"
                " VALUES (NULL, 'raw', 'x', NULL, '[\"a\"]')"
            )
            await conn.close()
            assert await auth.lookup("raw") == AccessKey("raw", "x", "", (), ("a",))
            # idents PostgreSQL text cannot hold are simply unknown
            assert await auth.lookup("nul\x00byte") is None
            assert await auth.lookup(b"bad\xff".decode("utf-8", "surrogateescape")) is None
        finally:
            await auth.close()

    asyncio.run(go())


def test_start_fails_with_config_error_for_a_missing_database(postgres_server: PostgresServer) -> None:
    async def go() -> None:
        auth = PostgresStore(postgres_server.dsn("no_such_db"))
        with pytest.raises(ConfigError, match="no_such_db"):
            await auth.start()

    asyncio.run(go())


def test_database_down_gives_auth_unavailable_quickly_and_recovers(own_server: PostgresServer) -> None:
    dsn = own_server.new_database()
    add(dsn)

    async def go() -> None:
        auth = PostgresStore(dsn, lookup_timeout_s=2.0)
        await auth.start()
        try:
            assert await auth.lookup("sensor1") == KEY
            await asyncio.to_thread(own_server.stop)
            # lookups fail fast, concurrently, and the loop keeps running meanwhile
            gaps: list[float] = []

            async def ticker() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            tick_task = asyncio.create_task(ticker())
            start = time.monotonic()
            results = await asyncio.gather(*(auth.lookup("sensor1") for _ in range(20)), return_exceptions=True)
            assert time.monotonic() - start < 2.5
            assert all(isinstance(r, AuthUnavailable) for r in results), results
            await asyncio.sleep(0.1)
            tick_task.cancel()
            assert gaps and max(gaps) < 0.5
            await asyncio.to_thread(own_server.start)
            # no restart of anything: the pool reconnects by itself
            assert await auth.lookup("sensor1") == KEY
        finally:
            if not own_server.running:
                await asyncio.to_thread(own_server.start)
            await auth.close()

    asyncio.run(go())


def test_start_with_the_database_down_then_serves_when_it_returns(own_server: PostgresServer) -> None:
    dsn = own_server.new_database()

    async def go() -> None:
        await asyncio.to_thread(own_server.stop)
        auth = PostgresStore(dsn, lookup_timeout_s=1.0)
        try:
            await auth.start()  # does not fail: it keeps trying in the background
            with pytest.raises(AuthUnavailable):
                await auth.lookup("sensor1")
            await asyncio.to_thread(own_server.start)
            await asyncio.to_thread(add, dsn)
            assert await auth.lookup("sensor1") == KEY
        finally:
            if not own_server.running:
                await asyncio.to_thread(own_server.start)
            await auth.close()

    asyncio.run(go())


def test_changes_yields_idents_changed_by_another_connection(postgres_dsn: str) -> None:
    async def go() -> None:
        auth = PostgresStore(postgres_dsn)
        await auth.start()
        changes = auth.changes()
        try:
            # start listening, then change rows from elsewhere
            first = asyncio.ensure_future(next_change(changes))
            await listening(postgres_dsn)
            conn = await asyncpg.connect(postgres_dsn)
            try:
                await conn.execute(
                    "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) VALUES ('o', 'a', 's', '[]', '[]')"
                )
                assert await first == {"a"}
                await conn.execute("UPDATE authkeys SET subchans = '[\"x\"]' WHERE ident = 'a'")
                assert await next_change(changes) == {"a"}
                await conn.execute("UPDATE authkeys SET ident = 'b' WHERE ident = 'a'")
                assert await next_change(changes) == {"a", "b"}
                await conn.execute("DELETE FROM authkeys WHERE ident = 'b'")
                assert await next_change(changes) == {"b"}
                # several changes in one transaction arrive together
                async with conn.transaction():
                    for ident in ("c", "d", "e"):
                        await conn.execute("INSERT INTO authkeys (ident, secret) VALUES ($1, 's')", ident)
                assert await next_change(changes) == {"c", "d", "e"}
                await conn.execute("TRUNCATE authkeys")
                assert await next_change(changes) is None  # recheck all
            finally:
                await conn.close()
            # the keys CLI's writes notify too
            await asyncio.to_thread(add, postgres_dsn)
            assert await next_change(changes) == {"sensor1"}
        finally:
            await changes.aclose()  # type: ignore[attr-defined]
            await auth.close()

    asyncio.run(go())


def test_changes_survives_a_database_restart_and_says_recheck_all(own_server: PostgresServer) -> None:
    dsn = own_server.new_database()

    async def go() -> None:
        auth = PostgresStore(dsn)
        await auth.start()
        changes = auth.changes()
        try:
            pending = asyncio.ensure_future(next_change(changes, timeout_s=15))
            await listening(dsn)
            await asyncio.to_thread(own_server.stop)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_server.start)
            assert await pending is None  # reconnected: anything may have changed
            await asyncio.to_thread(add, dsn)
            assert await next_change(changes) == {"sensor1"}
        finally:
            if not own_server.running:
                await asyncio.to_thread(own_server.start)
            await changes.aclose()  # type: ignore[attr-defined]
            await auth.close()

    asyncio.run(go())


def test_unresponsive_database_times_out_within_the_lookup_bound() -> None:
    # A listener that never speaks: TCP connects, PostgreSQL's handshake never completes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    dsn = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/postgres"

    async def go() -> None:
        auth = PostgresStore(dsn, lookup_timeout_s=0.5)
        start = time.monotonic()
        await auth.start()  # gives up waiting, keeps retrying in the background
        assert time.monotonic() - start < 6
        try:
            start = time.monotonic()
            with pytest.raises(AuthUnavailable, match="timed out"):
                await auth.lookup("sensor1")
            assert time.monotonic() - start < 1.0
        finally:
            await auth.close()

    try:
        asyncio.run(go())
    finally:
        silent.close()


def test_a_read_only_role_can_serve_a_table_made_by_its_owner(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.new_database()
    database = dsn.rsplit("/", 1)[1]
    make_reader_role(postgres_server)
    add(dsn)  # as the owner: creates table and trigger
    postgres_server.psql("GRANT SELECT ON authkeys TO hpfeeds_reader", database)
    reader_dsn = f"postgresql://hpfeeds_reader@127.0.0.1:{postgres_server.port}/{database}"

    async def go() -> None:
        auth = PostgresStore(reader_dsn)
        await auth.start()
        changes = auth.changes()
        try:
            assert await auth.lookup("sensor1") == KEY
            pending = asyncio.ensure_future(next_change(changes))
            await listening(dsn)
            await asyncio.to_thread(run_keys_revoke, dsn)
            assert await pending == {"sensor1"}
            key = await auth.lookup("sensor1")
            assert key is not None and key.subchans == ()
        finally:
            await changes.aclose()  # type: ignore[attr-defined]
            await auth.close()

    asyncio.run(go())


def run_keys_revoke(dsn: str) -> None:
    from .conftest import run_keys

    assert run_keys("revoke", "sensor1", "--sub", "ctl", "--auth", dsn).code == 0


def test_a_read_only_role_starts_without_the_trigger_and_warns(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = postgres_server.new_database()
    database = dsn.rsplit("/", 1)[1]
    make_reader_role(postgres_server)
    postgres_server.psql(
        "CREATE TABLE authkeys (id serial PRIMARY KEY,"
        " owner TEXT, ident TEXT, secret TEXT, pubchans TEXT, subchans TEXT);"
        "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) VALUES ('o', 'i', 's', '[\"a\"]', '[]');"
        "GRANT SELECT ON authkeys TO hpfeeds_reader;",
        database,
    )
    reader_dsn = f"postgresql://hpfeeds_reader@127.0.0.1:{postgres_server.port}/{database}"

    async def go() -> None:
        auth = PostgresStore(reader_dsn)
        await auth.start()
        try:
            assert await auth.lookup("i") == AccessKey("i", "s", "o", ("a",), ())
        finally:
            await auth.close()

    with caplog.at_level("WARNING", logger="hpfeeds3.broker.auth.postgres"):
        asyncio.run(go())
    assert "cannot create the change trigger" in caplog.text


# --- only valid keys are served -----------------------------------------------------------


async def _lookups(dsn: str, idents: list[str]) -> list[AccessKey | None]:
    auth = PostgresStore(dsn)
    await auth.start()
    try:
        return [await auth.lookup(ident) for ident in idents]
    finally:
        await auth.close()


def test_null_empty_and_bad_channel_rows_are_no_such_key(postgres_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    rows = {
        "null-secret": "NULL, '[\"a\"]'",
        "empty-secret": "'', '[\"a\"]'",
        "empty-channel": "'s3cret', '[\"a\", \"\"]'",
        "numeric-channel": "'s3cret', '[7]'",
        "numeric-text-secret": "'12345', '[\"a\"]'",  # a TEXT column holds text: valid
    }

    async def go() -> list[AccessKey | None]:
        auth = PostgresStore(postgres_dsn)
        await auth.start()  # creates the table
        await auth.close()
        conn = await asyncpg.connect(postgres_dsn)
        for ident, values in rows.items():
            await conn.execute(
                f"INSERT INTO authkeys (owner, ident, secret, pubchans) VALUES ('o', '{ident}', {values})"
            )
        await conn.close()
        return await _lookups(postgres_dsn, [*rows, *rows])

    with caplog.at_level("WARNING", logger="hpfeeds3.broker.auth"):
        found = asyncio.run(go())
    assert found[:5] == [None, None, None, None, AccessKey("numeric-text-secret", "12345", "o", ("a",), ())]
    assert found[5:] == found[:5]
    for ident in ("null-secret", "empty-secret", "empty-channel", "numeric-channel"):
        lines = [r.getMessage() for r in caplog.records if repr(ident) in r.getMessage()]
        assert len(lines) == 1 and "not valid" in lines[0], (ident, lines)  # once per ident
        assert "s3cret" not in lines[0]
    # keys refuses them with its exit code, naming the rule and not the secret
    from .conftest import run_keys

    r = run_keys("show", "empty-channel", "--auth", postgres_dsn)
    assert r.code == ExitCode.INVALID_KEY and "must not be empty" in r.err and "s3cret" not in r.err


@pytest.mark.parametrize(("column", "value"), [("bytea", "'\\x733363726574'::bytea"), ("integer", "12345")])
def test_binary_and_numeric_secret_columns_are_no_such_key(postgres_dsn: str, column: str, value: str) -> None:
    """A table made by hand with a secret column of another type: its rows are not keys."""

    async def go() -> list[AccessKey | None]:
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(
            f"CREATE TABLE authkeys (id serial PRIMARY KEY, owner TEXT, ident TEXT UNIQUE, secret {column},"
            " pubchans TEXT, subchans TEXT)"
        )
        await conn.execute(f"INSERT INTO authkeys (ident, secret, pubchans) VALUES ('typed', {value}, '[]')")
        await conn.close()
        return await _lookups(postgres_dsn, ["typed"])

    assert asyncio.run(go()) == [None]


# --- no password in any log or error line -------------------------------------------------


def test_passwords_in_the_dsn_never_reach_logs_or_errors(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    from .conftest import run_keys

    secret_words = ("hunter2", "hunter3", "hunter4")
    missing_db = postgres_server.dsn("no_such_db").replace(":unused@", ":hunter2@") + "?password=hunter3"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    unreachable = f"postgresql://u:hunter2@127.0.0.1:{closed_port}/db?sslpassword=hunter4&password=hunter3"

    async def go() -> list[str]:
        seen = []
        with pytest.raises(ConfigError) as refused:
            await PostgresStore(missing_db).start()
        seen.append(str(refused.value))
        auth = PostgresStore(unreachable, lookup_timeout_s=0.5)
        await auth.start()  # not reachable: starts anyway, warns
        try:
            with pytest.raises(AuthUnavailable) as unavailable:
                await auth.lookup("x")
            seen.append(str(unavailable.value))
            seen.append(repr(auth))
        finally:
            await auth.close()
        return seen

    with caplog.at_level("DEBUG"):
        seen = asyncio.run(go())
    r = run_keys("list", "--auth", unreachable)
    assert r.code == ExitCode.STORE_UNAVAILABLE
    seen += [r.err, *(rec.getMessage() for rec in caplog.records)]
    assert any("not reachable" in line for line in seen)
    assert any("u:***@" in line for line in seen)
    for line in seen:
        assert not any(word in line for word in secret_words), line


def test_an_index_on_ident_is_ensured_once(postgres_dsn: str) -> None:
    """Our table's UNIQUE index serves; a table made by hand without one gets authkeys_ident."""
    count_sql = """SELECT count(*) FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = 'authkeys'::regclass AND a.attname = 'ident'"""

    async def go() -> list[int]:
        await _lookups(postgres_dsn, [])  # creates our table
        conn = await asyncpg.connect(postgres_dsn)
        ours = await conn.fetchval(count_sql)
        await conn.execute("DROP TABLE authkeys")
        await conn.execute(
            "CREATE TABLE authkeys (id serial, owner TEXT, ident TEXT, secret TEXT, pubchans TEXT, subchans TEXT)"
        )
        before = await conn.fetchval(count_sql)
        await conn.close()
        await _lookups(postgres_dsn, [])
        await _lookups(postgres_dsn, [])  # a second start adds nothing
        conn = await asyncpg.connect(postgres_dsn)
        after = await conn.fetchval(count_sql)
        await conn.close()
        return [ours, before, after]

    assert asyncio.run(go()) == [1, 0, 1]
