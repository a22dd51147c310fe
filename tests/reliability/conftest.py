"""Fixtures of the reliability suite: brokers with an exporter, and a canary."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess, free_port, write_users_json

from .support import RELIABILITY_USERS


class Broker:
    """A broker subprocess plus the port of its Prometheus exporter."""

    def __init__(self, process: BrokerProcess, exporter_port: int) -> None:
        self.process = process
        self.port = process.port
        self.exporter_port = exporter_port
        self.pid = process.proc.pid

    def log(self) -> str:
        return self.process.log()

    def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        """The log once it holds ``needle`` (lines are written by a writer thread, a little later)."""
        return self.process.wait_log(needle, timeout)


def wait_healthy(exporter_port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{exporter_port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("exporter not healthy")
        time.sleep(0.05)


def launch(cwd: Path, *args: str, users: dict | None = None, env: dict[str, str] | None = None) -> Broker:
    """``hpfeeds-broker --bind 127.0.0.1:PORT --exporter 127.0.0.1:PORT2 ...``."""
    extra = list(args)
    if not any(a == "--auth" for a in extra):
        write_users_json(cwd / "users.json", users or RELIABILITY_USERS)
        extra += ["--auth", "users.json"]
    port, exporter = free_port(), free_port()
    process = BrokerProcess(
        ["--bind", f"127.0.0.1:{port}", "--exporter", f"127.0.0.1:{exporter}", *extra], cwd=cwd, env=env, port=port
    )
    try:
        process.wait_ready()
        wait_healthy(exporter)
    except BaseException:
        process.stop()
        raise
    return Broker(process, exporter)


@pytest.fixture
def reliable_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """``reliable_broker(*args, users=None, env=None)``: stopped after the test."""
    started: list[Broker] = []

    def start(*args: str, users: dict | None = None, env: dict[str, str] | None = None) -> Broker:
        b = launch(tmp_path, *args, users=users, env=env)
        started.append(b)
        return b

    yield start
    for b in started:
        b.process.stop()
