"""Each auth backend on its own, against real files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hpfeeds3.broker.auth import AccessKey, AuthUnavailable
from hpfeeds3.broker.auth.chain import ChainStore
from hpfeeds3.broker.auth.env import EnvStore
from hpfeeds3.broker.auth.jsonfile import JsonStore
from hpfeeds3.broker.auth.spec import open_backend
from hpfeeds3.broker.auth.sqlite import SqliteStore
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
        auth = SqliteStore(str(path))
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


def tables_and_rows(path: Path) -> tuple[list[tuple[str, str]], list[tuple[object, ...]]]:
    db = sqlite3.connect(path)
    try:
        tables = sorted(db.execute("select name, sql from sqlite_master where type = 'table'").fetchall())
        return tables, db.execute("select * from authkeys order by id").fetchall()
    finally:
        db.close()


def index_names(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("select name from sqlite_master where type = 'index' and tbl_name = 'authkeys'").fetchall()
        return [name for (name,) in rows if not name.startswith("sqlite_")]
    finally:
        db.close()


def test_sqlite_opens_a_reference_database_adding_only_the_ident_index(tmp_path: Path) -> None:
    path = tmp_path / "sqlite.db"
    conn = sqlite3.connect(path)
    conn.executescript(REFERENCE_SCHEMA)
    with conn:
        conn.execute(
            "insert into authkeys (owner, ident, secret, pubchans, subchans) values (?, ?, ?, ?, ?)",
            ("o", "sensor", "s", json.dumps(["a", "b"]), json.dumps([])),
        )
    conn.close()
    before = tables_and_rows(path)
    assert index_names(path) == []

    async def scenario() -> AccessKey | None:
        auth = SqliteStore(str(path))
        await auth.start()
        try:
            return await auth.lookup("sensor")
        finally:
            await auth.close()

    assert run(scenario()) == AccessKey("sensor", "s", "o", ("a", "b"), ())
    assert tables_and_rows(path) == before
    assert index_names(path) == ["authkeys_ident"]


def test_sqlite_locked_database_gives_auth_unavailable_after_a_bounded_wait(tmp_path: Path) -> None:
    """A lookup that must read the file (it changed since the snapshot) while a writer holds
    the lock: "unavailable" after a bounded wait, in a thread, never a wait on the loop."""
    path = tmp_path / "sqlite.db"

    async def scenario() -> float:
        auth = SqliteStore(str(path), locked_timeout_s=0.3)
        await auth.start()
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("insert into authkeys (owner, ident, secret) values ('o', 'y', 's')")  # a change
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
        run(SqliteStore(str(tmp_path / "no" / "such" / "dir" / "sqlite.db")).start())


def test_env_backend_reads_the_spec_variables() -> None:
    env = {"HPFEEDS_TEST_SECRET": "test", "HPFEEDS_TEST_SUBCHANS": "spam", "HPFEEDS_TEST_PUBCHANS": "spam,eggs"}
    auth = EnvStore(env)
    assert run(auth.lookup("test")) == AccessKey("test", "test", "test", ("spam", "eggs"), ("spam",))
    assert run(auth.lookup("other")) is None


def test_json_backend_reloads_on_change_and_keeps_last_good_data(tmp_path: Path, caplog) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"a": {"owner": "o", "secret": "s1", "pubchans": [], "subchans": ["x"]}}))

    def keys_file(ident: str, secret: str) -> str:
        return json.dumps({ident: {"owner": "o", "secret": secret, "pubchans": [], "subchans": []}})

    async def until(done: Callable[[], Awaitable[bool]], text: str) -> None:
        """Write ``text`` until ``done()``: the watcher may not be watching yet right after start."""
        for i in range(200):
            if i % 10 == 0:
                path.write_text(text)
            if await done():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not reached after writing {text!r}")

    async def has(auth: JsonStore, ident: str, secret: str) -> bool:
        key = await auth.lookup(ident)
        return key is not None and key.secret == secret

    async def scenario() -> None:
        auth = JsonStore(str(path))
        await auth.start()
        assert (await auth.lookup("a")).secret == "s1"  # type: ignore[union-attr]
        await until(lambda: has(auth, "b", "s2"), keys_file("b", "s2"))
        assert await auth.lookup("a") is None
        caplog.clear()

        async def broken_file_read() -> bool:
            return "keeping the last good keys: cannot reload" in caplog.text

        await until(broken_file_read, "{ broken")
        assert (await auth.lookup("b")).secret == "s2"  # type: ignore[union-attr]
        # The watcher outlives the broken file: the next good one is read.
        await until(lambda: has(auth, "c", "s3"), keys_file("c", "s3"))
        assert await auth.lookup("b") is None
        await auth.close()

    with caplog.at_level(logging.INFO, logger="hpfeeds3"):
        run(scenario())


def inotify_watches() -> int:
    """The inotify watches this process holds (Linux: an ``inotify wd:`` line each in fdinfo)."""
    count = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        with contextlib.suppress(OSError):
            count += Path("/proc/self/fdinfo", fd).read_text().count("inotify wd:")
    return count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")
def test_the_json_key_file_is_watched_in_its_directory_not_the_directories_beside_it(tmp_path: Path) -> None:
    """The data directory usually sits beside the key file (./hpfeeds-data next to
    ./users.json): a watch of the whole tree woke the watcher at every write of the
    durable log."""
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"a": {"owner": "o", "secret": "s", "pubchans": [], "subchans": []}}))
    for directory in ("hpfeeds-data/durable/channels/events.0123", "other/deeper"):
        (tmp_path / directory).mkdir(parents=True)

    async def scenario() -> int:
        before = inotify_watches()
        auth = JsonStore(str(path))
        await auth.start()
        try:
            for _ in range(500):  # the watcher's thread adds its watches once it runs
                if inotify_watches() > before:
                    break
                await asyncio.sleep(0.01)
            return inotify_watches() - before
        finally:
            await auth.close()

    assert run(scenario()) == 1


def test_json_backend_missing_or_broken_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        run(JsonStore(str(tmp_path / "nope.json")).start())
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError):
        run(JsonStore(str(tmp_path / "bad.json")).start())


def test_chain_first_backend_that_knows_the_ident_wins() -> None:
    first = EnvStore({"HPFEEDS_A_SECRET": "from-first"})
    second = EnvStore({"HPFEEDS_A_SECRET": "from-second", "HPFEEDS_B_SECRET": "b"})
    chain = ChainStore([first, second])
    assert run(chain.lookup("a")).secret == "from-first"  # type: ignore[union-attr]
    assert run(chain.lookup("b")).secret == "b"  # type: ignore[union-attr]
    assert run(chain.lookup("c")) is None


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("sqlite", SqliteStore),
        ("sqlite:/tmp/x.db", SqliteStore),
        ("env", EnvStore),
        ("users.json", JsonStore),
    ],
)
def test_auth_specs(spec: str, kind: type) -> None:
    assert isinstance(open_backend(spec), kind)


def test_unknown_auth_spec_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        open_backend("mongodb://x")


# --- the index on ident, and the reference broker ------------------------------------------

REFERENCE_READS = """
import json, sys
from hpfeeds.broker.auth.sqlite import Authenticator
auth = Authenticator(sys.argv[1])
print(json.dumps([auth.get_authkey(i) for i in sys.argv[2:]]))
"""


def test_the_reference_broker_reads_a_db_we_created_or_indexed(tmp_path: Path) -> None:
    from tests.support.reference import run_reference_python

    ours = tmp_path / "ours.db"
    theirs = tmp_path / "theirs.db"
    conn = sqlite3.connect(theirs)
    conn.executescript(REFERENCE_SCHEMA)
    conn.close()

    async def scenario() -> None:
        for path in (ours, theirs):
            auth = SqliteStore(str(path))
            await auth.start()  # creates (ours) or indexes (theirs)
            await auth.close()

    run(scenario())
    for path in (ours, theirs):
        assert index_names(path) == ["authkeys_ident"]
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values (?, ?, ?, ?, ?)",
                ("o", "sensor", "s", '["a"]', "[]"),
            )
        conn.close()
        r = run_reference_python(REFERENCE_READS, [str(path), "sensor", "nobody"])
        assert r.returncode == 0, r.stderr.decode()
        assert json.loads(r.stdout) == [
            {"secret": "s", "ident": "sensor", "pubchans": ["a"], "subchans": [], "owner": "o"},
            None,
        ]


def test_sqlite_lookup_uses_the_index_from_10_to_100000_keys(tmp_path: Path) -> None:
    """The query plan is an index search at every size; the time per lookup is recorded (-s)."""
    import time

    from hpfeeds3.broker.auth.sqlite import LOOKUP_SQL

    path = tmp_path / "sqlite.db"

    async def start() -> SqliteStore:
        auth = SqliteStore(str(path))
        await auth.start()
        return auth

    loop = asyncio.new_event_loop()
    auth = loop.run_until_complete(start())
    try:
        have = 0
        figures = []
        for size in (10, 1_000, 10_000, 100_000):
            conn = sqlite3.connect(path)
            with conn:
                conn.executemany(
                    "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('', ?, 's', '[]', '[]')",
                    ((f"ident-{i}",) for i in range(have, size)),
                )
            plan = " ".join(str(r[-1]) for r in conn.execute("explain query plan " + LOOKUP_SQL, ("x",)))
            conn.close()
            have = size
            assert "USING INDEX authkeys_ident" in plan, plan
            n = 2_000
            t0 = time.perf_counter()
            for i in range(n):
                auth.lookup_now(f"unknown-{i}")
            unknown_us = (time.perf_counter() - t0) / n * 1e6
            t0 = time.perf_counter()
            for i in range(n):
                assert auth.lookup_now(f"ident-{i % size}") is not None
            known_us = (time.perf_counter() - t0) / n * 1e6
            figures.append(f"{size:>7} keys: unknown ident {unknown_us:.1f} us, known ident {known_us:.1f} us")
        print("\nsqlite AUTH lookup (lookup_now) per call:\n" + "\n".join(figures))
    finally:
        loop.run_until_complete(auth.close())
        loop.close()


# --- a key needs a text ident, a non-empty text secret, non-empty text channels ------------

BAD_SQLITE_ROWS = {
    "null-secret": ("null-secret", None, '["a"]'),
    "empty-secret": ("empty-secret", "", '["a"]'),
    "blob-secret": ("blob-secret", b"s3cret", '["a"]'),
    "numeric-secret": ("numeric-secret", 12345, '["a"]'),
    "empty-channel": ("empty-channel", "s3cret", '["a", ""]'),
    "numeric-channel": ("numeric-channel", "s3cret", "[1]"),
    "bad-channels": ("bad-channels", "s3cret", "not json"),
}


def test_sqlite_rows_without_a_valid_key_are_no_such_key_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sqlite.db"
    conn = sqlite3.connect(path)
    # Columns without a declared type keep what is stored: a TEXT column
    # would turn the number 12345 into the text '12345', a valid secret.
    conn.executescript(
        REFERENCE_SCHEMA.replace("create table authkeys", "create table unused")
        + "create table authkeys (id integer primary key autoincrement, owner, ident, secret, pubchans, subchans);"
    )
    with conn:
        for ident, secret, pubchans in BAD_SQLITE_ROWS.values():
            conn.execute(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('o', ?, ?, ?, '[]')",
                (ident, secret, pubchans),
            )
        conn.execute("insert into authkeys (owner, ident, secret) values ('o', 'good', 'g')")
    conn.close()

    async def scenario() -> None:
        auth = SqliteStore(str(path))
        await auth.start()
        try:
            for ident in BAD_SQLITE_ROWS:
                assert auth.lookup_now(ident) is None, ident
                assert await auth.lookup(ident) is None, ident
            assert auth.lookup_now("good") == AccessKey("good", "g", "o")
        finally:
            await auth.close()

    with caplog.at_level("WARNING", logger="hpfeeds3.broker.auth"):
        run(scenario())
    for ident in BAD_SQLITE_ROWS:
        lines = [r.getMessage() for r in caplog.records if repr(ident) in r.getMessage()]
        assert len(lines) == 1, (ident, lines)  # once, though looked up twice
        assert "not valid" in lines[0]
        assert "s3cret" not in lines[0] and "12345" not in lines[0]


def test_sqlite_snapshot_holds_every_valid_key_decoded_and_decodes_again_only_what_changed(tmp_path: Path) -> None:
    """After a restart every sensor's first AUTH is a lookup: the snapshot (read in a
    thread) holds the keys decoded, so the loop never validates a row; after a change,
    the keys whose rows did not change are the same objects, not decoded again."""
    path = tmp_path / "sqlite.db"
    conn = sqlite3.connect(path)
    conn.executescript(REFERENCE_SCHEMA)
    with conn:
        for ident in ("a", "b"):
            conn.execute(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('o', ?, 's', '[\"c\"]', '[]')",
                (ident,),
            )
        conn.execute("insert into authkeys (owner, ident, secret) values ('o', 'bad', '')")

    async def scenario() -> None:
        auth = SqliteStore(str(path))
        await auth.start()
        try:
            snapshot = auth._snapshot
            assert snapshot is not None
            assert snapshot["a"] == AccessKey("a", "s", "o", pubchans=("c",))  # decoded before any lookup
            assert snapshot["bad"].__class__ is tuple  # invalid: a row, logged when asked for
            a, b = snapshot["a"], snapshot["b"]
            with conn:
                conn.execute("update authkeys set secret = 'rotated' where ident = 'b'")
            await auth._take_snapshot()  # what the change poll does
            assert auth.lookup_now("a") is a  # its row did not change: the same key
            changed = auth.lookup_now("b")
            assert changed is not b and changed is not None and changed.secret == "rotated"
            assert auth.lookup_now("bad") is None
        finally:
            await auth.close()

    try:
        run(scenario())
    finally:
        conn.close()


def test_json_store_serves_valid_keys_and_refuses_invalid_ones(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(
        json.dumps(
            {
                "good": {"secret": "g", "pubchans": ["a"]},
                "empty": {"secret": ""},
                "numeric": {"secret": 5},
                "no-secret": {"pubchans": ["a"]},
                "empty-channel": {"secret": "s", "subchans": [""]},
            }
        )
    )

    async def scenario() -> None:
        auth = JsonStore(str(path))
        await auth.start()
        try:
            assert auth.lookup_now("good") == AccessKey("good", "g", "", ("a",), ())
            for ident in ("empty", "numeric", "no-secret", "empty-channel"):
                assert auth.lookup_now(ident) is None, ident
        finally:
            await auth.close()

    run(scenario())


def test_json_store_owner_defaults_to_empty_as_keys_shows_it(tmp_path: Path) -> None:
    from hpfeeds3.broker.keys import open_store

    path = tmp_path / "users.json"
    path.write_text(json.dumps({"sensor": {"secret": "s"}}))

    async def served() -> AccessKey | None:
        auth = JsonStore(str(path))
        await auth.start()
        try:
            return await auth.lookup("sensor")
        finally:
            await auth.close()

    with open_store(str(path)) as store:
        shown = store.get("sensor")
    assert run(served()) == shown == AccessKey("sensor", "s", "")


# --- env: the canonical spelling only ------------------------------------------------------


def test_env_matches_only_the_canonical_spelling() -> None:
    auth = EnvStore({"HPFEEDS_SENSOR_SECRET": "s", "HPFEEDS_SENSOR_1.X_SECRET": "t"})
    assert auth.lookup_now("sensor") == AccessKey("sensor", "s", "sensor")
    assert auth.lookup_now("sensor_1.x") is not None
    for spelling in ("Sensor", "SENSOR", "sEnsor", "\u017fensor", "sensor ", "SENSOR_1.X"):
        assert auth.lookup_now(spelling) is None, spelling
    # the reference's other case mappings cannot reach a variable set either
    tried = {a + b + c for a in "sS\u017f" for b in "eE" for c in "nN"}
    assert [t + "sor" for t in tried if auth.lookup_now(t + "sor") is not None] == ["sensor"]


def test_env_empty_secret_or_channel_is_no_such_key() -> None:
    auth = EnvStore({"HPFEEDS_A_SECRET": "", "HPFEEDS_B_SECRET": "b", "HPFEEDS_B_PUBCHANS": "x,,y"})
    assert auth.lookup_now("a") is None
    assert auth.lookup_now("b") == AccessKey("b", "b", "b", ("x", "y"), ())  # empty items are separators


# --- specs: one parser for the broker and keys ---------------------------------------------


@pytest.mark.parametrize("spec", [" sqlite", "sqlite:", "sqlite ", "mongodb://x", "keys.yaml", " keys.json"])
def test_bad_specs_are_refused_by_broker_and_keys_alike(spec: str, tmp_path: Path) -> None:
    from hpfeeds3.broker.keys import ExitCode
    from tests.keys.conftest import run_keys

    with pytest.raises(ConfigError):
        open_backend(spec)
    assert run_keys("list", "--auth", spec).code == ExitCode.BAD_ARGUMENTS


def test_json_spec_is_case_insensitive_for_both(tmp_path: Path) -> None:
    from tests.keys.conftest import run_keys

    path = tmp_path / "KEYS.JSON"
    assert run_keys("add", "a", "--secret", "s", "--auth", str(path)).code == 0
    assert isinstance(open_backend(str(path)), JsonStore)


# --- the chain when a store is unavailable -------------------------------------------------


def test_chain_serves_idents_of_available_stores_while_one_is_unavailable(tmp_path: Path) -> None:
    locked = tmp_path / "locked.db"
    second = EnvStore({"HPFEEDS_LOCAL_SECRET": "l"})

    async def scenario() -> None:
        first = SqliteStore(str(locked), locked_timeout_s=0.2)
        chain = ChainStore([first, second])
        await chain.start()
        writer = sqlite3.connect(locked, isolation_level=None)
        # A change since the snapshot, then the lock: the store must read the file and cannot.
        writer.execute("insert into authkeys (owner, ident, secret) values ('o', 'other', 's')")
        writer.execute("begin exclusive")
        try:
            assert (await chain.lookup("local")) == AccessKey("local", "l", "local")
            with pytest.raises(AuthUnavailable):
                await chain.lookup("remote")  # only the unavailable store could know it
        finally:
            writer.execute("rollback")
            writer.close()
        assert await chain.lookup("remote") is None
        await chain.close()

    run(scenario())


def test_sqlite_serves_from_its_snapshot_only_while_no_commit_came_after_it(tmp_path: Path) -> None:
    """The keys are held in memory, but every commit by any process is seen at the next
    lookup (the file's change counter): a key removed or changed is never served from memory.
    Until the next snapshot such lookups read the file; a writer holding the lock without
    committing changes nothing, and the snapshot answers without waiting for it."""
    path = tmp_path / "sqlite.db"
    conn = sqlite3.connect(path)
    conn.executescript(REFERENCE_SCHEMA)
    with conn:
        for ident in ("a", "b", "c"):
            conn.execute(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('o', ?, 's', '[]', '[]')",
                (ident,),
            )

    async def scenario() -> None:
        auth = SqliteStore(str(path), locked_timeout_s=0.3)
        await auth.start()
        assert auth._snapshot is not None and set(auth._snapshot) == {"a", "b", "c"}
        assert auth.lookup_now("a") == AccessKey("a", "s", "o")
        with conn:
            conn.execute("delete from authkeys where ident = 'a'")
        assert auth.lookup_now("a") is None  # at once, not at the next poll
        with conn:
            conn.execute("update authkeys set secret = 'rotated' where ident = 'b'")
        assert auth.lookup_now("b").secret == "rotated"  # type: ignore[union-attr]
        await auth._take_snapshot()  # what the change poll does
        assert set(auth._snapshot or ()) == {"b", "c"}
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("begin exclusive")
        try:
            assert auth.lookup_now("c") == AccessKey("c", "s", "o")  # no commit since: from memory
        finally:
            locker.execute("rollback")
            locker.close()
        conn.execute("pragma journal_mode=wal").fetchall()  # commits no longer change the counter
        await auth._take_snapshot()
        assert auth._snapshot is None
        with conn:
            conn.execute("delete from authkeys where ident = 'c'")
        assert auth.lookup_now("c") is None
        await auth.close()

    try:
        run(scenario())
    finally:
        conn.close()
