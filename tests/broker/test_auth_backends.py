"""Each auth backend on its own, against real files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from hpfeeds3.broker.auth import (
    AccessKey,
    AuthUnavailable,
    ChainAuthenticator,
    EnvAuthenticator,
    JsonFileAuthenticator,
    SqliteAuthenticator,
    from_spec,
)
from hpfeeds3.broker.config import ConfigError

REFERENCE_SCHEMA = """
create table logs (id integer primary key autoincrement, data TEXT);
create table stats (id integer primary key autoincrement, ak TEXT, uid TEXT, data TEXT);
create table authkeys (id integer primary key autoincrement,
    owner TEXT, ident TEXT, secret TEXT, pubchans TEXT, subchans TEXT);
"""


def run(coro):
    return asyncio.run(coro)


def test_sqlite_creates_the_reference_schema_and_sees_inserts_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "sqlite.db"

    async def scenario() -> None:
        auth = SqliteAuthenticator(str(path))
        await auth.start()
        assert await auth.lookup("ident") is None
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(
                "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) "
                "VALUES ('owner', 'ident', 'secret', '[\"chan1\"]', '[\"chan1\"]')"
            )
        assert await auth.lookup("ident") == AccessKey("ident", "secret", "owner", ("chan1",), ("chan1",))
        with conn:
            conn.execute("update authkeys set subchans = '[]' where ident = 'ident'")
        assert (await auth.lookup("ident")).subchans == ()  # type: ignore[union-attr]
        with conn:
            conn.execute("delete from authkeys")
        assert await auth.lookup("ident") is None
        conn.close()
        await auth.close()

    run(scenario())
    tables = {r[0] for r in sqlite3.connect(path).execute("select name from sqlite_master where type='table'")}
    assert {"authkeys", "logs", "stats"} <= tables


def test_sqlite_opens_a_reference_database_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "sqlite.db"
    conn = sqlite3.connect(path)
    conn.executescript(REFERENCE_SCHEMA)
    with conn:
        conn.execute(
            "insert into authkeys (owner, ident, secret, pubchans, subchans) values (?, ?, ?, ?, ?)",
            ("o", "sensor", "s", json.dumps(["a", "b"]), json.dumps([])),
        )
    conn.close()
    before = path.read_bytes()

    async def scenario() -> AccessKey | None:
        auth = SqliteAuthenticator(str(path))
        await auth.start()
        try:
            return await auth.lookup("sensor")
        finally:
            await auth.close()

    assert run(scenario()) == AccessKey("sensor", "s", "o", ("a", "b"), ())
    assert path.read_bytes() == before


def test_sqlite_locked_database_gives_auth_unavailable_after_a_bounded_wait(tmp_path: Path) -> None:
    path = tmp_path / "sqlite.db"

    async def scenario() -> float:
        auth = SqliteAuthenticator(str(path), locked_timeout_s=0.3)
        await auth.start()
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("begin exclusive")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(AuthUnavailable):
            await auth.lookup("x")
        elapsed = loop.time() - t0
        writer.execute("rollback")
        writer.close()
        assert await auth.lookup("x") is None  # recovers at once
        await auth.close()
        return elapsed

    assert 0.2 < run(scenario()) < 2.0


def test_sqlite_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        run(SqliteAuthenticator(str(tmp_path / "no" / "such" / "dir" / "sqlite.db")).start())


def test_env_backend_reads_the_spec_variables() -> None:
    env = {"HPFEEDS_TEST_SECRET": "test", "HPFEEDS_TEST_SUBCHANS": "spam", "HPFEEDS_TEST_PUBCHANS": "spam,eggs"}
    auth = EnvAuthenticator(env)
    assert run(auth.lookup("test")) == AccessKey("test", "test", "test", ("spam", "eggs"), ("spam",))
    assert run(auth.lookup("other")) is None


def test_json_backend_reloads_on_change_and_keeps_last_good_data(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"a": {"owner": "o", "secret": "s1", "pubchans": [], "subchans": ["x"]}}))

    async def wait_for(auth: JsonFileAuthenticator, ident: str, secret: str | None) -> None:
        for _ in range(100):
            key = await auth.lookup(ident)
            if (key.secret if key else None) == secret:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{ident} never became {secret}")

    async def scenario() -> None:
        auth = JsonFileAuthenticator(str(path))
        await auth.start()
        await asyncio.sleep(0.3)  # let the watcher start
        assert (await auth.lookup("a")).secret == "s1"  # type: ignore[union-attr]
        path.write_text(json.dumps({"b": {"owner": "o", "secret": "s2", "pubchans": [], "subchans": []}}))
        await wait_for(auth, "b", "s2")
        assert await auth.lookup("a") is None
        path.write_text("{ broken")
        await asyncio.sleep(0.6)
        assert (await auth.lookup("b")).secret == "s2"  # type: ignore[union-attr]
        # The watcher outlives the broken file: the next good one is read.
        path.write_text(json.dumps({"c": {"owner": "o", "secret": "s3", "pubchans": [], "subchans": []}}))
        await wait_for(auth, "c", "s3")
        assert await auth.lookup("b") is None
        await auth.close()

    run(scenario())


def test_json_backend_missing_or_broken_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        run(JsonFileAuthenticator(str(tmp_path / "nope.json")).start())
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError):
        run(JsonFileAuthenticator(str(tmp_path / "bad.json")).start())


def test_chain_first_backend_that_knows_the_ident_wins() -> None:
    first = EnvAuthenticator({"HPFEEDS_A_SECRET": "from-first"})
    second = EnvAuthenticator({"HPFEEDS_A_SECRET": "from-second", "HPFEEDS_B_SECRET": "b"})
    chain = ChainAuthenticator([first, second])
    assert run(chain.lookup("a")).secret == "from-first"  # type: ignore[union-attr]
    assert run(chain.lookup("b")).secret == "b"  # type: ignore[union-attr]
    assert run(chain.lookup("c")) is None


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("sqlite", SqliteAuthenticator),
        ("sqlite:/tmp/x.db", SqliteAuthenticator),
        ("env", EnvAuthenticator),
        ("users.json", JsonFileAuthenticator),
    ],
)
def test_auth_specs(spec: str, kind: type) -> None:
    assert isinstance(from_spec(spec), kind)


def test_unknown_auth_spec_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        from_spec("mongodb://x")
