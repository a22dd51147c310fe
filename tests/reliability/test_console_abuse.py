"""Attacks on the console (``--admin``) by someone who holds a token or can reach its port,
and on the text of the log lines a client chooses.

Each test states the attack, measures it (``pytest -s`` prints the figures)
and asserts the broker withstands it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hpfeeds3.broker.admin.api import SECURITY_HEADERS
from hpfeeds3.broker.admin.sessions import LOGIN_WINDOW_S, LOGINS_PER_TOKEN
from tests.console.conftest import console_broker
from tests.support.broker import RawClient, free_port

from .support import metric, record, scrape


def test_a_viewer_logging_in_in_a_loop_does_not_end_the_admins_session(tmp_path: Path) -> None:
    """A viewer's 1,000 logins in a row (once enough to end every other session):
    the admin's session lives on; the viewer's logins are limited and its own
    sessions capped."""
    exporter = free_port()
    with console_broker(tmp_path, "--exporter", f"127.0.0.1:{exporter}") as console:
        admin = console.admin()
        statuses: dict[int, int] = {}
        start = time.monotonic()
        for _ in range(1_000):
            # A fresh client each time: no cookie, so no login ends the one before.
            status = console.client().login(console.viewer_token).status
            statuses[status] = statuses.get(status, 0) + 1
        elapsed = time.monotonic() - start
        admin_view = admin.get("/api/v1/session")
        samples = scrape(exporter)
    record(
        "viewer_login_loop",
        logins=1_000,
        seconds=round(elapsed, 2),
        statuses=statuses,
        admin_session_status=admin_view.status,
        logins_blocked_metric=metric(samples, "hpfeeds_broker_console_logins_total", result="blocked"),
    )
    assert admin_view.status == 200, admin_view
    assert admin_view.body["name"] == "alice"
    # One window's logins succeed (more only if the loop outlasted a window on a slow machine).
    windows = 1 + int(elapsed // LOGIN_WINDOW_S)
    assert LOGINS_PER_TOKEN <= statuses.get(200, 0) <= windows * LOGINS_PER_TOKEN
    assert statuses.get(200, 0) + statuses.get(429, 0) == 1_000
    assert metric(samples, "hpfeeds_broker_console_logins_total", result="blocked") == statuses.get(429, 0)


def test_deeply_nested_json_to_login_is_a_failed_login(tmp_path: Path) -> None:
    """60,000 nested arrays in a /login body (under the 64 KiB body cap) raised a
    RecursionError: a 500 without the security headers and a traceback per
    request, not counted as a failed login. It is a 400 like any body that is
    not JSON, with the headers, counted as a failed login."""
    exporter = free_port()
    with console_broker(tmp_path, "--exporter", f"127.0.0.1:{exporter}") as console:
        http = console.client()
        replies = [
            http.request("POST", "/login", raw=b"[" * 60_000, headers={"Content-Type": "application/json"})
            for _ in range(3)
        ]
        samples = scrape(exporter)
        log = console.broker.wait_log("console login failed")
    tracebacks = log.count("Traceback")
    record(
        "login_nested_json",
        statuses=[r.status for r in replies],
        failed_logins_metric=metric(samples, "hpfeeds_broker_console_logins_total", result="failed"),
        tracebacks=tracebacks,
    )
    for r in replies:
        assert r.status == 400, r
        assert r.body == {"error": "body is not JSON"}
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, name
    assert metric(samples, "hpfeeds_broker_console_logins_total", result="failed") == 3
    assert tracebacks == 0, log


def test_a_literal_backslash_in_an_ident_does_not_read_as_an_escape(reliable_broker) -> None:
    """An ident typed as the four characters ``\\x00`` and an ident holding a NUL
    read differently in the ERROR and the log: the client's backslash is doubled."""
    b = reliable_broker()
    errors = []
    for ident in ("x\\x00", "x\x00"):
        with RawClient(b.port) as c:
            c.auth(ident, "any-secret")
            errors.append(c.expect_error())
            c.expect_closed()
    log = b.process.wait_log("authentication failed for x\\x00 ")
    lines = [line for line in log.splitlines() if "authentication failed" in line]
    record("backslash_ident", errors=errors, log_lines=lines)
    assert errors == [
        "authfail: Authentication failed for x\\\\x00",
        "authfail: Authentication failed for x\\x00",
    ]
    assert len(lines) == 2
    assert "authentication failed for x\\\\x00 from" in lines[0]
    assert "authentication failed for x\\x00 from" in lines[1]
    assert json.dumps(lines[0]) != json.dumps(lines[1])
