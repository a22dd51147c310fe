"""Fixtures of the reliability suite: brokers with an exporter, and a canary."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import BrokerProcess, launch_broker, write_users_json
from tests.support.broker import wait_healthy as wait_healthy

from .support import RELIABILITY_USERS


class Broker:
    """A broker subprocess (``process``) with its exporter; reads through to it:
    ``port``, ``exporter_port``, ``pid``, ``log()``, ``wait_log()``."""

    def __init__(self, process: BrokerProcess, exporter_port: int | None = None) -> None:
        self.process = process
        if exporter_port is not None:
            process.exporter_port = exporter_port

    def __getattr__(self, name: str) -> Any:
        return getattr(self.process, name)


def launch(cwd: Path, *args: str, users: dict | None = None, env: dict[str, str] | None = None) -> Broker:
    """``hpfeeds-broker --bind 127.0.0.1:PORT --exporter 127.0.0.1:PORT2 ...``, serving and healthy."""
    extra = list(args)
    if not any(a == "--auth" for a in extra):
        write_users_json(cwd / "users.json", users or RELIABILITY_USERS)
        extra += ["--auth", "users.json"]
    return Broker(launch_broker(cwd, *extra, env=env, exporter=True))


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
