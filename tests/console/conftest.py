"""A real broker with the console on (``--admin``), a token file, and an HTTP client for its API."""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpfeeds3.broker.admin.tokens import generate_token, hash_token
from tests.support.broker import BrokerProcess, free_port, sqlite_add_key, wait_for_port


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any


class Http:
    """A small HTTP client with a cookie jar, like a browser tab (or a script with a bearer token)."""

    def __init__(self, base: str, bearer: str | None = None) -> None:
        self.base = base
        self.bearer = bearer
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf: str | None = None

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> Reply:
        h = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if self.bearer:
            h.setdefault("Authorization", f"Bearer {self.bearer}")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with self.opener.open(req, timeout=10) as r:
                status, content, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, content, hdrs = e.code, e.read(), e.headers
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content.decode("utf-8", "replace")
        return Reply(status, parsed, hdrs)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, *, csrf: bool = True) -> Reply:
        headers = {"X-CSRF-Token": self.csrf} if csrf and self.csrf else {}
        return self.request("POST", path, body if body is not None else {}, headers)

    def login(self, token: str) -> Reply:
        r = self.request("POST", "/login", {"token": token})
        if r.status == 200:
            self.csrf = r.body["csrf"]
        return r


@dataclass
class Console:
    broker: BrokerProcess
    base: str
    port: int
    admin_token: str
    viewer_token: str
    db: Path
    tokens_path: Path

    def client(self, bearer: str | None = None) -> Http:
        return Http(self.base, bearer)

    def admin(self) -> Http:
        h = self.client()
        assert h.login(self.admin_token).status == 200
        return h


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.1)


def write_tokens(path: Path) -> tuple[str, str]:
    admin, viewer = generate_token(), generate_token()
    path.write_text(
        "# console tokens\n"
        f"alice admin sha256:{hash_token(admin)}\n"
        f"grafana viewer sha256:{hash_token(viewer)}  # read only\n"
    )
    return admin, viewer


@contextlib.contextmanager
def console_broker(tmp_path: Path, *extra: str, scheme: str = "http") -> Iterator[Console]:
    """A broker on sqlite with one key, the console on, two tokens (alice: admin, grafana: viewer)."""
    db = tmp_path / "keys.db"
    sqlite_add_key(db, "existing-sensor", "s3cret", ["honeypot.events"], [], owner="ops")
    tokens_path = tmp_path / "tokens.txt"
    admin, viewer = write_tokens(tokens_path)
    port, admin_port = free_port(), free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--auth", f"sqlite:{db}", "--revocation-poll", "0.2"]
    args += ["--admin", f"127.0.0.1:{admin_port}", "--admin-tokens", str(tokens_path), *extra]
    b = BrokerProcess(args, cwd=tmp_path, port=port)
    try:
        b.wait_ready()
        wait_for_port(admin_port, proc=b.proc)
        yield Console(b, f"{scheme}://127.0.0.1:{admin_port}", port, admin, viewer, db, tokens_path)
    finally:
        b.stop()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    with console_broker(tmp_path) as c:
        yield c
