"""Every ``hpfeeds-broker keys`` command, against sqlite, JSON and PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpfeeds3.broker.auth.base import AccessKey
from hpfeeds3.broker.keys import ExitCode, open_store
from tests.support.terminal import CTRL_C, Terminal

from .conftest import Result

Keys = Callable[..., Result]


def stored(spec: str, ident: str) -> AccessKey | None:
    with open_store(spec) as store:
        return store.get(ident)


def test_add_generates_a_secret_printed_once_and_stores_the_key(keys: Keys, store_spec: str) -> None:
    r = keys("add", "sensor1", "--owner", "alice", "--pub", "cowrie.sessions", "dionaea.capture", "--sub", "ctl",
             "--auth", store_spec)  # fmt: skip
    assert r.code == ExitCode.OK, r.err
    secret = r.out.strip()
    assert len(secret) >= 32 and "\n" not in secret  # token_urlsafe(24): 192 bits
    assert "only once" in r.err
    assert stored(store_spec, "sensor1") == AccessKey(
        "sensor1", secret, "alice", ("cowrie.sessions", "dionaea.capture"), ("ctl",)
    )
    # a second add generates a different secret
    r2 = keys("add", "sensor2", "--auth", store_spec)
    assert r2.code == 0 and r2.out.strip() != secret


def test_add_with_given_secret_prints_no_secret(keys: Keys, store_spec: str) -> None:
    r = keys("add", "s1", "--secret", "hunter2", "--pub", "a", "--auth", store_spec)
    assert r.code == 0 and r.out == ""
    r = keys("add", "s2", "--secret", "-", "--auth", store_spec, stdin="from-stdin\n")
    assert r.code == 0 and r.out == ""
    assert stored(store_spec, "s1") == AccessKey("s1", "hunter2", "", ("a",), ())
    key = stored(store_spec, "s2")
    assert key is not None and key.secret == "from-stdin"


def test_add_existing_ident_fails_and_changes_nothing(keys: Keys, store_spec: str) -> None:
    assert keys("add", "s1", "--secret", "one", "--auth", store_spec).code == 0
    r = keys("add", "s1", "--secret", "two", "--auth", store_spec)
    assert r.code == ExitCode.IDENT_EXISTS
    assert r.err.count("\n") == 1 and "already exists" in r.err
    key = stored(store_spec, "s1")
    assert key is not None and key.secret == "one"


def test_list_is_an_aligned_table_without_secrets(keys: Keys, store_spec: str) -> None:
    keys("add", "a-very-long-ident", "--owner", "alice", "--pub", "p1", "p2", "--secret", "SECRET1",
         "--auth", store_spec)  # fmt: skip
    keys("add", "b", "--secret", "SECRET2", "--sub", "s1", "--durable", "--auth", store_spec)
    r = keys("list", "--auth", store_spec)
    assert r.code == 0
    assert "SECRET" not in r.out
    lines = r.out.splitlines()
    assert lines[0].split() == ["IDENT", "OWNER", "DURABLE", "PUBCHANS", "SUBCHANS"]
    assert lines[1].startswith("a-very-long-ident  alice")
    assert lines[2].startswith("b ")
    # columns line up
    assert lines[0].index("OWNER") == lines[1].index("alice") == lines[2].index("-")
    assert lines[0].index("DURABLE") == lines[1].index("no") == lines[2].index("yes")
    assert lines[0].index("PUBCHANS") == lines[1].index("p1, p2")

    r = keys("list", "--json", "--auth", store_spec)
    doc = json.loads(r.out)
    assert doc == [
        {"ident": "a-very-long-ident", "owner": "alice", "pubchans": ["p1", "p2"], "subchans": [], "durable": False},
        {"ident": "b", "owner": "", "pubchans": [], "subchans": ["s1"], "durable": True},
    ]


def store_an_invalid_key(spec: str, ident: str) -> None:
    """A key row with an empty secret, written past the key commands (as SQL or an editor would)."""
    if spec.startswith("sqlite:"):
        import sqlite3

        db = sqlite3.connect(spec.removeprefix("sqlite:"))
        with db:
            db.execute(
                "insert into authkeys (owner, ident, secret, pubchans, subchans) values ('', ?, '', '[]', '[]')",
                (ident,),
            )
        db.close()
    elif spec.endswith(".json"):
        doc = json.loads(Path(spec).read_text())
        doc[ident] = {"owner": "", "secret": "", "pubchans": [], "subchans": []}
        Path(spec).write_text(json.dumps(doc))
    else:
        import asyncio

        import asyncpg

        async def insert() -> None:
            db = await asyncpg.connect(spec)
            try:
                await db.execute(
                    "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) VALUES ('', $1, '', '[]', '[]')",
                    ident,
                )
            finally:
                await db.close()

        asyncio.run(insert())


def test_list_shows_the_valid_keys_and_names_the_invalid_ones(keys: Keys, store_spec: str) -> None:
    keys("add", "good1", "--secret", "SECRET1", "--pub", "p", "--auth", store_spec)
    keys("add", "good2", "--secret", "SECRET2", "--sub", "s", "--auth", store_spec)
    store_an_invalid_key(store_spec, "broken")
    r = keys("list", "--auth", store_spec)
    assert r.code == ExitCode.OK, r
    assert [line.split()[0] for line in r.out.splitlines()] == ["IDENT", "good1", "good2"], r.out
    (line,) = r.err.splitlines()
    assert "'broken'" in line and "secret must not be empty" in line, r.err
    r = keys("list", "--json", "--auth", store_spec)
    assert r.code == ExitCode.OK, r
    assert [k["ident"] for k in json.loads(r.out)] == ["good1", "good2"]
    assert "'broken'" in r.err


def test_show_text_json_and_secret_on_request(keys: Keys, store_spec: str) -> None:
    keys("add", "s1", "--owner", "o", "--pub", "p", "--secret", "SECRET", "--auth", store_spec)
    r = keys("show", "s1", "--auth", store_spec)
    assert r.code == 0 and "SECRET" not in r.out and "pubchans: p" in r.out
    r = keys("show", "s1", "--json", "--auth", store_spec)
    assert json.loads(r.out) == {"ident": "s1", "owner": "o", "pubchans": ["p"], "subchans": [], "durable": False}
    r = keys("show", "s1", "--json", "--show-secret", "--auth", store_spec)
    assert json.loads(r.out)["secret"] == "SECRET"
    assert keys("show", "nope", "--auth", store_spec).code == ExitCode.NO_SUCH_IDENT


def test_grant_and_revoke_single_channels_keep_the_others(keys: Keys, store_spec: str) -> None:
    keys("add", "s1", "--pub", "a", "b", "--sub", "x", "--secret", "s", "--auth", store_spec)
    r = keys("grant", "s1", "--pub", "c", "a", "--sub", "y", "--auth", store_spec)
    assert r.code == 0, r.err
    assert "'a' was already granted" in r.err
    assert stored(store_spec, "s1") == AccessKey("s1", "s", "", ("a", "b", "c"), ("x", "y"))
    r = keys("revoke", "s1", "--pub", "b", "--sub", "x", "zzz", "--auth", store_spec)
    assert r.code == 0, r.err
    assert "'zzz' was not granted" in r.err
    assert stored(store_spec, "s1") == AccessKey("s1", "s", "", ("a", "c"), ("y",))
    assert keys("grant", "s1", "--auth", store_spec).code == ExitCode.BAD_ARGUMENTS
    assert keys("grant", "nope", "--pub", "a", "--auth", store_spec).code == ExitCode.NO_SUCH_IDENT
    assert keys("revoke", "nope", "--pub", "a", "--auth", store_spec).code == ExitCode.NO_SUCH_IDENT


def test_update_replaces_owner_and_whole_lists(keys: Keys, store_spec: str) -> None:
    keys("add", "s1", "--owner", "old", "--pub", "a", "b", "--sub", "x", "--secret", "s", "--auth", store_spec)
    assert keys("update", "s1", "--owner", "new", "--pub", "c", "--auth", store_spec).code == 0
    assert stored(store_spec, "s1") == AccessKey("s1", "s", "new", ("c",), ("x",))
    assert keys("update", "s1", "--sub", "--auth", store_spec).code == 0  # empty list
    assert stored(store_spec, "s1") == AccessKey("s1", "s", "new", ("c",), ())
    assert keys("update", "s1", "--auth", store_spec).code == ExitCode.BAD_ARGUMENTS


def test_rotate_prints_a_new_secret(keys: Keys, store_spec: str) -> None:
    keys("add", "s1", "--secret", "old", "--pub", "a", "--auth", store_spec)
    r = keys("rotate", "s1", "--auth", store_spec)
    assert r.code == 0
    new = r.out.strip()
    assert len(new) >= 32
    assert stored(store_spec, "s1") == AccessKey("s1", new, "", ("a",), ())
    r = keys("rotate", "s1", "--secret", "chosen", "--auth", store_spec)
    assert r.code == 0 and r.out == ""
    key = stored(store_spec, "s1")
    assert key is not None and key.secret == "chosen"
    assert keys("rotate", "nope", "--auth", store_spec).code == ExitCode.NO_SUCH_IDENT


def test_remove(keys: Keys, store_spec: str) -> None:
    keys("add", "s1", "--secret", "x", "--auth", store_spec)
    keys("add", "s2", "--secret", "x", "--auth", store_spec)
    # one unknown ident: nothing is removed
    assert keys("remove", "s1", "nope", "--auth", store_spec).code == ExitCode.NO_SUCH_IDENT
    assert stored(store_spec, "s1") is not None
    assert keys("remove", "s1", "s2", "--auth", store_spec).code == 0
    assert stored(store_spec, "s1") is None and stored(store_spec, "s2") is None
    assert keys("remove", "s1", "--auth", store_spec).code == ExitCode.NO_SUCH_IDENT


@pytest.mark.parametrize(
    "args",
    [
        ["add", ""],
        ["add", "x" * 256],
        ["add", "é" * 128],  # 256 bytes of UTF-8
        ["add", "s1", "--pub", ""],
        ["add", "s1", "--sub", "c" * 256],
        ["add", "s1", "--secret", ""],
    ],
)
def test_invalid_names_are_refused(keys: Keys, tmp_path: Path, args: list[str]) -> None:
    spec = f"sqlite:{tmp_path / 'k.db'}"
    r = keys(*args, "--auth", spec)
    assert r.code == ExitCode.INVALID_KEY, r.err
    assert r.err.count("\n") == 1


def test_names_at_the_limit_are_accepted(keys: Keys, store_spec: str) -> None:
    ident, channel = "i" * 255, "é" * 127  # 255 and 254 bytes
    assert keys("add", ident, "--pub", channel, "--secret", "s", "--auth", store_spec).code == 0
    assert keys("grant", ident, "--sub", "c" * 256, "--auth", store_spec).code == ExitCode.INVALID_KEY
    assert stored(store_spec, ident) == AccessKey(ident, "s", "", (channel,), ())


def test_store_errors_have_their_exit_codes(keys: Keys, tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    r = keys("list", "--auth", f"sqlite:{missing}")
    assert r.code == ExitCode.STORE_UNAVAILABLE and "no such file" in r.err
    assert not missing.exists()  # reading never creates a store
    (tmp_path / "junk.db").write_bytes(b"this is not a database at all" * 100)
    assert keys("list", "--auth", f"sqlite:{tmp_path / 'junk.db'}").code == ExitCode.STORE_UNAVAILABLE
    r = keys("list", "--auth", "postgresql://nobody:pw@127.0.0.1:1/db")
    assert r.code == ExitCode.STORE_UNAVAILABLE
    assert "pw" not in r.err and "***" in r.err  # the password is never printed
    assert keys("list", "--auth", "nonsense").code == ExitCode.BAD_ARGUMENTS
    assert keys("list", "--auth", "env").code == ExitCode.BAD_ARGUMENTS
    assert keys("frobnicate").code == ExitCode.BAD_ARGUMENTS
    assert keys().code == ExitCode.BAD_ARGUMENTS
    assert keys("add").code == ExitCode.BAD_ARGUMENTS


def test_help_lists_commands_and_exit_codes(keys: Keys) -> None:
    r = keys("--help")
    assert r.code == 0
    for command in ("add", "list", "show", "grant", "revoke", "update", "rotate", "remove", "export", "import",
                    "copy"):  # fmt: skip
        assert f"    {command} " in r.out
    assert "exit codes:" in r.out and "no such ident" in r.out
    assert "exit codes:" in keys("grant", "--help").out


def test_auth_option_before_the_command(keys: Keys, tmp_path: Path) -> None:
    spec = f"sqlite:{tmp_path / 'k.db'}"
    assert keys("--auth", spec, "add", "s1", "--secret", "x").code == 0
    assert stored(spec, "s1") is not None


def test_default_store_is_sqlite_db_in_the_current_directory(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert keys("add", "s1", "--secret", "x").code == 0
    assert (tmp_path / "sqlite.db").exists()
    assert "s1" in keys("list").out


def test_json_store_is_written_atomically_with_mode_0600(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    assert keys("add", "s1", "--secret", "x", "--pub", "a", "--auth", str(path)).code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"s1": {"owner": "", "secret": "x", "pubchans": ["a"], "subchans": []}}
    path.chmod(0o640)  # an operator's choice is kept
    assert keys("grant", "s1", "--sub", "b", "--auth", str(path)).code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["keys.json"]  # no temporary file left


def test_module_runs_as_a_program(tmp_path: Path) -> None:
    spec = f"sqlite:{tmp_path / 'k.db'}"
    cmd = [sys.executable, "-m", "hpfeeds3.broker.keys.cli"]
    r = subprocess.run([*cmd, "add", "s1", "--auth", spec], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and len(r.stdout.strip()) >= 32
    r = subprocess.run([*cmd, "show", "nope", "--auth", spec], capture_output=True, text=True, timeout=30)
    assert r.returncode == ExitCode.NO_SUCH_IDENT


@pytest.mark.parametrize("where", ["missing parent", "parent is a file", "unwritable directory"])
@pytest.mark.parametrize("kind", ["sqlite", "json"])
def test_add_where_the_store_cannot_be_created_is_one_line_and_exit_5(
    keys: Keys, tmp_path: Path, where: str, kind: str
) -> None:
    if where == "missing parent":
        path = tmp_path / "no" / "such" / "dir" / "keys"
    elif where == "parent is a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "keys"
    elif os.geteuid() == 0:
        # Root writes into any directory of a normal file system; procfs
        # refuses new files to everyone.
        path = Path("/proc/self/keys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        path = locked / "keys"
    spec = f"sqlite:{path}.db" if kind == "sqlite" else f"{path}.json"
    r = keys("add", "sensor1", "--secret", "s3cret", "--auth", spec)
    assert r.code == ExitCode.STORE_UNAVAILABLE, r
    assert r.err.count("\n") == 1 and r.err.startswith("hpfeeds-broker keys: error: "), r.err
    assert "Traceback" not in r.err and "s3cret" not in r.err
    assert r.out == ""


def test_add_where_the_postgres_table_cannot_be_made_is_exit_5(keys: Keys, postgres_server) -> None:
    r = keys("add", "sensor1", "--secret", "s3cret", "--auth", postgres_server.dsn("no_such_db"))
    assert r.code == ExitCode.STORE_UNAVAILABLE and r.err.count("\n") == 1 and "unused" not in r.err


def test_export_onto_an_existing_0644_file_leaves_it_0600(keys: Keys, tmp_path: Path) -> None:
    spec = f"sqlite:{tmp_path / 'k.db'}"
    assert keys("add", "s1", "--secret", "x", "--auth", spec).code == 0
    target = tmp_path / "backup.json"
    target.write_text("old contents")
    target.chmod(0o644)
    r = keys("export", "--auth", spec, "--to", str(target))
    assert r.code == 0 and "mode 0600" in r.err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text())["s1"]["secret"] == "x"
    assert sorted(os.listdir(tmp_path)) == ["backup.json", "k.db"]  # no temporary file left


@pytest.mark.parametrize("ident", ["ident", "identifier", "secret", "owner", "pubchans", "subscribe"])
def test_export_then_import_round_trips_idents_named_like_fields(keys: Keys, store_spec: str, tmp_path: Path,
                                                                 ident: str) -> None:  # fmt: skip
    key = AccessKey(ident, "s3cret-" + ident, "o", ("a",), ("b",))
    with open_store(store_spec, create=True) as store:
        store.add(key)
        store.add(AccessKey("other", "s3cret-other", "", (), ()))
    dump = tmp_path / "dump.json"
    assert keys("export", "--auth", store_spec, "--to", str(dump)).code == 0
    target = f"sqlite:{tmp_path / 'target.db'}"
    r = keys("import", str(dump), "--auth", target)
    assert r.code == 0, r.err
    assert stored(target, ident) == key
    # and the single key alone (a one-entry document) too
    single = tmp_path / "single.json"
    single.write_text(json.dumps({ident: json.loads(dump.read_text())[ident]}))
    r = keys("import", str(single), "--auth", f"sqlite:{tmp_path / 'single.db'}")
    assert r.code == 0, r.err
    assert stored(f"sqlite:{tmp_path / 'single.db'}", ident) == key


@pytest.mark.parametrize(
    "doc",
    [
        [{"ident": {"secret": "TOPSECRET"}, "secret": "TOPSECRET"}],
        [{"identifier": 5, "secret": "TOPSECRET"}],
        [{"secret": "TOPSECRET", "pubchans": ["a"]}],
        [{"ident": "a", "secret": "TOPSECRET", "pubchans": "TOPSECRET"}],
        [{"ident": "a", "secret": "TOPSECRET", "subchans": [""]}],
        [{"ident": "a", "secret": "TOPSECRET", "owner": {"x": "TOPSECRET"}}],
        {"a": {"secret": "TOPSECRET", "pubchans": [1]}},
        {"a": {"secret": 123456789}},
        [{"ident": "a", "secret": "TOPSECRET"}, {"ident": "a", "secret": "TOPSECRET"}],
        [{"ident": "a", "secret": "TOPSECRET"}, "TOPSECRET"],
    ],
)
def test_no_error_line_holds_a_secret(keys: Keys, tmp_path: Path, doc: object) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    r = keys("import", str(path), "--auth", f"sqlite:{tmp_path / 'k.db'}")
    assert r.code in (ExitCode.INVALID_KEY, ExitCode.BAD_ARGUMENTS), r
    assert r.err.count("\n") == 1
    assert "TOPSECRET" not in r.err and "123456789" not in r.err, r.err


def test_generated_secrets_never_start_with_a_dash() -> None:
    # One in 64 URL-safe secrets would: after -s on a command line it reads as an option.
    from hpfeeds3.broker.auth.records import SECRET_BYTES, generate_secret

    secrets_ = [generate_secret() for _ in range(2000)]
    assert not [s for s in secrets_ if s.startswith("-")]
    assert all(len(s) >= SECRET_BYTES for s in secrets_)


@pytest.fixture
def keys_at_a_terminal(tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    """``hpfeeds-broker keys --auth sqlite:... ARGS`` at a pseudo-terminal."""
    started: list[Terminal] = []
    broker = str(Path(sys.executable).parent / "hpfeeds-broker")

    def start(*args: str) -> Terminal:
        terminal = Terminal([broker, "keys", "--auth", f"sqlite:{tmp_path / 'keys.db'}", *args], cwd=str(tmp_path))
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def test_secret_from_a_terminal_is_prompted_for_and_not_echoed(
    keys_at_a_terminal: Callable[..., Terminal], tmp_path: Path
) -> None:
    terminal = keys_at_a_terminal("add", "sensor1", "--pub", "p", "--secret", "-")
    terminal.read_until(b"secret for 'sensor1'")
    terminal.type(b"typed-secret-1\n")
    code, err = terminal.wait(30)
    assert code == ExitCode.OK, err
    assert b"typed-secret-1" not in terminal.screen, terminal.screen
    key = stored(f"sqlite:{tmp_path / 'keys.db'}", "sensor1")
    assert key is not None and key.secret == "typed-secret-1"


@pytest.mark.parametrize(
    ("args", "prompt"),
    [(["add", "s1", "--secret", "-"], b"secret for 's1'"), (["import", "-"], b"Ctrl-D")],
    ids=["add", "import"],
)
def test_ctrl_c_at_a_terminal_prompt_exits_130_without_a_traceback(
    keys_at_a_terminal: Callable[..., Terminal], args: list[str], prompt: bytes
) -> None:
    terminal = keys_at_a_terminal(*args)
    if args[0] == "import":
        terminal.stderr_until(prompt)
    else:
        terminal.read_until(prompt)
    terminal.type(CTRL_C)
    code, err = terminal.wait(30)
    assert code == 130, err
    assert "Traceback" not in err, err
