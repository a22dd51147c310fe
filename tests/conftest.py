"""Fixtures shared by the whole suite: our broker as a subprocess, raw clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess, free_port, write_users_json
from tests.support.postgres import PostgresServer

# Keys every ``broker`` fixture knows (users.json, the reference format).
USERS = {
    "alice": {"secret": "alice-secret", "pubchans": ["chan1", "chan2"], "subchans": ["chan1", "chan2"]},
    "bob": {"secret": "bob-secret", "pubchans": ["chan1"], "subchans": ["chan1", "chan2", "private"]},
    "reader": {"secret": "reader-secret", "pubchans": [], "subchans": ["chan1", "chan2"]},
}


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """``start_broker(*args, env=None, users=USERS)``: a broker on a free loopback port."""
    started: list[BrokerProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, users: dict | None = USERS, bind: bool = True
    ) -> BrokerProcess:
        extra = list(args)
        if users is not None and not any(a == "--auth" or a.startswith("--auth=") for a in extra):
            write_users_json(tmp_path / "users.json", users)
            extra += ["--auth", "users.json"]
        port = free_port()
        if bind:
            extra = ["--bind", f"127.0.0.1:{port}", *extra]
        b = BrokerProcess(extra, cwd=tmp_path, env=env, port=port)
        started.append(b)
        return b.wait_ready()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def broker(start_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A broker with the ``USERS`` keys and sub-second limits for fast tests."""
    return start_broker("--auth-timeout", "1", "--shutdown-drain", "1")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL (pgserver) for the session; tests take fresh databases from it."""
    server = PostgresServer.start_new()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh empty database on the session server."""
    return postgres_server.new_database()
