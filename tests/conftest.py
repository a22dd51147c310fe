"""Fixtures shared by the whole suite: our broker as a subprocess, raw clients.

Under ``CI=true`` a skipped test fails the run unless its reason is one of
``CI_ALLOWED_SKIPS``: a test that cannot run in CI must say why, here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess, free_port, write_users_json
from tests.support.postgres import PostgresServer

# Skip reasons CI accepts (a prefix of the reason), each with why the test may not run there.
CI_ALLOWED_SKIPS = {
    "no IPv6": "the machine may have IPv6 disabled; binding [::1] is then impossible",
    "the reference broker's TLS needs Python <= 3.10": (
        "the reference broker's TLS breaks on Python >= 3.11's asyncio, and CI's Python is 3.11+"
    ),
}


# A test run started as a background job of a shell without job control (`cmd &` in a
# script, nohup) inherits SIGINT ignored, and so would every CLI it starts: the tests
# that press Ctrl-C at one would wait out their timeouts. Handled here, SIGINT is back
# to its default in each program the tests execute.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _skip_reason(longrepr: object) -> str:
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _refuse_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI=true, a skip whose reason is not allowed becomes a failure."""
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report.longrepr)
    if not any(reason.startswith(allowed) for allowed in CI_ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true ({reason!r}); CI allows only these skips (tests/conftest.py CI_ALLOWED_SKIPS): "
            f"{sorted(CI_ALLOWED_SKIPS)}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _refuse_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _refuse_skip(outcome.get_result())  # type: ignore[attr-defined]


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
