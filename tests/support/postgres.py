"""A real PostgreSQL for the test suite, from the ``pgserver`` wheel.

``pgserver.get_server()`` starts PostgreSQL on a unix socket only and offers no
stop/start, which the "database down" tests need. So we use the pieces it ships
(the binaries, ``initdb``/``pg_ctl`` wrappers, and, when running as root, its
helpers that create the unprivileged ``pgserver`` system user PostgreSQL
insists on) and drive ``pg_ctl`` ourselves, listening on 127.0.0.1 at a fixed
port so that a stopped-then-started server answers at the same DSN.

Use::

    server = PostgresServer.start_new()      # initdb + start, on 127.0.0.1
    dsn = server.new_database()              # a fresh, empty database
    server.stop(); server.start()            # the same DSN works again
    server.destroy()                         # stop and delete the data

Or the session fixture ``postgres_server`` (see ``tests/keys/conftest.py``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

# Seconds given to pg_ctl to start or stop the server.
PG_CTL_TIMEOUT_S = 30.0


def _pgserver_commands() -> Any:
    """pgserver's command wrappers (importing pgserver warns when XDG_RUNTIME_DIR is unset; harmless)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver import _commands
    return _commands


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, on 127.0.0.1:port."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.pgdata = root / "data"
        self.sockdir = root / "sock"
        self.log = root / "postgres.log"
        self.port = port
        self.system_user: str | None = None
        self.running = False

    # -- lifecycle -----------------------------------------------------------

    @classmethod
    def start_new(cls) -> PostgresServer:
        root = Path(tempfile.mkdtemp(prefix="hpfeeds3-pg-"))
        server = cls(root, _free_port())
        try:
            server._init()
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    def _init(self) -> None:
        _commands = _pgserver_commands()

        self.pgdata.mkdir()
        self.sockdir.mkdir()
        if platform.system() != "Windows" and os.geteuid() == 0:
            # PostgreSQL refuses to run as root: pgserver's helpers create an
            # unprivileged user and open the paths up to it.
            import pwd

            from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

            self.system_user = "pgserver"
            ensure_user_exists(self.system_user)
            ensure_prefix_permissions(self.pgdata)
            ensure_prefix_permissions(_commands.POSTGRES_BIN_PATH)
            ensure_folder_permissions(_commands.POSTGRES_BIN_PATH, 0o555)
            ensure_folder_permissions(_commands.POSTGRES_BIN_PATH.parent / "lib", 0o444)
            entry = pwd.getpwnam(self.system_user)
            for path in (self.root, self.pgdata, self.sockdir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        _commands.initdb(
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
            pgdata=self.pgdata,
            user=self.system_user,
            timeout=PG_CTL_TIMEOUT_S,
        )

    def _pg_ctl(self, args: list[str]) -> None:
        _commands = _pgserver_commands()

        _commands.pg_ctl(args, pgdata=self.pgdata, user=self.system_user, timeout=PG_CTL_TIMEOUT_S)

    def start(self) -> None:
        """Start (again) on the same port; returns when it accepts connections."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.sockdir} -c fsync=off -c full_page_writes=off"
        self._pg_ctl(["-w", "-o", options, "-l", str(self.log), "start"])
        self.running = True

    def stop(self) -> None:
        """Stop at once (``-m immediate``): clients see their connections drop."""
        if self.running:
            self._pg_ctl(["-w", "-m", "immediate", "stop"])
            self.running = False

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- access --------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:unused@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        _commands = _pgserver_commands()

        psql = _commands.POSTGRES_BIN_PATH / "psql"
        out = subprocess.run(
            [str(psql), "-v", "ON_ERROR_STOP=1", "-qAt", self.dsn(database)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=PG_CTL_TIMEOUT_S,
            check=True,
        )
        return out.stdout

    def new_database(self) -> str:
        """A fresh empty database; its DSN."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def wait_accepting(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"PostgreSQL not accepting on 127.0.0.1:{self.port}")
