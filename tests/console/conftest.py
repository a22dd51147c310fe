"""A real broker with the console on (``--admin``), a token file, and an HTTP client for its API."""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpfeeds3.broker.admin.tokens import generate_token, hash_token
from hpfeeds3.broker.auth.base import make_key
from hpfeeds3.broker.keys import open_store
from hpfeeds3.broker.state import Broker
from hpfeeds3.client import BlockingClient
from tests.support.broker import BrokerProcess, free_port, sqlite_add_key, wait_for_port, write_users_json
from tests.support.inprocess import idle_broker


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
def console_broker(tmp_path: Path, *extra: str, scheme: str = "http", store: str = "sqlite") -> Iterator[Console]:
    """A broker with one key in ``store`` (sqlite, json or a PostgreSQL DSN) and the console on.

    Tokens: alice (admin) and grafana (viewer). Its data directory is
    ``tmp_path/hpfeeds-data``: a second broker in the same ``tmp_path`` is a
    restart (the sqlite keys and the console's activity history are kept).
    """
    existing = {"owner": "ops", "secret": "s3cret", "pubchans": ["honeypot.events"], "subchans": []}
    if store == "json":
        db = write_users_json(tmp_path / "keys.json", {"existing-sensor": existing})
        auth = str(db)
    elif store.startswith("postgresql://"):  # a fresh database's DSN
        with open_store(store, create=True) as keys:
            keys.add(make_key("existing-sensor", "s3cret", "ops", ["honeypot.events"]))
        db, auth = tmp_path / "unused", store
    else:
        db = tmp_path / "keys.db"
        if not db.exists():  # a second broker in the same directory: a restart
            sqlite_add_key(db, "existing-sensor", "s3cret", ["honeypot.events"], [], owner="ops")
        auth = f"sqlite:{db}"
    tokens_path = tmp_path / "tokens.txt"
    admin, viewer = write_tokens(tokens_path)
    port, admin_port = free_port(), free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--auth", auth, "--revocation-poll", "0.2"]
    args += ["--admin", f"127.0.0.1:{admin_port}", "--admin-tokens", str(tokens_path), *extra]
    b = BrokerProcess(args, cwd=tmp_path, port=port)
    try:
        b.wait_ready()
        wait_for_port(admin_port, proc=b.proc)
        yield Console(b, f"{scheme}://127.0.0.1:{admin_port}", port, admin, viewer, db, tokens_path)
    finally:
        b.stop()


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A ``Broker`` on its own loop, serving nothing (for the tracker and the API in-process)."""
    loop = asyncio.new_event_loop()
    try:
        yield idle_broker(loop)
    finally:
        loop.close()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    with console_broker(tmp_path) as c:
        yield c


# --- a real browser ------------------------------------------------------------------------

BROWSER_PACKAGES = ("chromium", "chromium-driver")


def _chromium() -> tuple[str, str] | None:
    binary = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="session")
def chromium_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt-get when missing (as root, as .ci/run does)."""
    found = _chromium()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *BROWSER_PACKAGES], check=True, env=env, timeout=900, capture_output=True
        )
        found = _chromium()
    if found is None:
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    return found


@pytest.fixture(scope="module")
def browser(chromium_paths: tuple[str, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the browser tests save page screenshots: docs/console/ with CONSOLE_SCREENSHOTS=1."""
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        out = Path(__file__).resolve().parents[2] / "docs" / "console"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path


@contextlib.contextmanager
def sensor(console: Console, ident: str, secret: str) -> Iterator[BlockingClient]:
    """A connected client (no reconnect), closed on exit."""
    client = BlockingClient("127.0.0.1", console.port, ident, secret, reconnect=False)
    try:
        client.connect(timeout_s=5)
        yield client
    finally:
        client.close()


def publish(client: BlockingClient, channel: str, *payloads: str | bytes) -> None:
    for payload in payloads:
        client.publish(channel, payload)
    client.flush(5)


def fail_auth(console: Console, ident: str) -> None:
    """One AUTH with a wrong secret."""
    bad = BlockingClient("127.0.0.1", console.port, ident, "wrong secret", reconnect=False)
    with contextlib.suppress(Exception):
        bad.connect(timeout_s=5)
    bad.close()


def authenticates(console: Console, ident: str, secret: str, grace_s: float = 0.3) -> bool:
    """An AUTH with ``ident`` and ``secret`` is not refused within ``grace_s``."""
    try:
        with sensor(console, ident, secret) as client:
            client.wait_ready(grace_s)
        return True
    except Exception:
        return False


def wait_key_usable(console: Console, ident: str, secret: str, timeout: float = 10.0) -> None:
    """A key written to a watched store (JSON) is used once the broker saw the file change."""
    wait_until(lambda: authenticates(console, ident, secret), timeout, f"{ident} authenticates")
