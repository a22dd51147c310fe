"""The open-files limit: the broker raises its soft limit to the hard one at
start, and keeps the connection cap 64 descriptors below it (listeners, the
key store, logs, the exporter), refusing the connection over the cap with an
ERROR."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.conftest import USERS
from tests.support.broker import BrokerProcess, RawClient, free_port, write_users_json


def start(tmp_path: Path, nofile: tuple[int, int], *args: str) -> BrokerProcess:
    write_users_json(tmp_path / "users.json", USERS)
    port = free_port()
    b = BrokerProcess(
        ["--bind", f"127.0.0.1:{port}", "--auth", "users.json", *args], tmp_path, port=port, nofile=nofile
    )
    return b.wait_ready()


def soft_nofile(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)
    assert m, limits
    return int(m.group(1))


def test_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    b = start(tmp_path, (200, 400))
    try:
        assert soft_nofile(b.proc.pid) == 400
        assert "at most 336 connections" in b.log()  # 400 - 64, below the default 10,000
    finally:
        assert b.stop() == 0


def test_connections_are_capped_below_the_open_files_limit(tmp_path: Path) -> None:
    b = start(tmp_path, (100, 100))  # 100 - 64 = 36 connections
    conns: list[RawClient] = []
    try:
        assert "at most 36 connections" in b.log()
        # Authenticated, so none is a pre-auth connection the newcomer could displace.
        for _ in range(36):
            conns.append(RawClient(b.port).auth("alice", "alice-secret"))
        confirm = conns[0]
        confirm.subscribe("chan1")
        confirm.publish("chan1", b"all in")  # every AUTH before it is through
        assert confirm.messages(1)[0].payload == b"all in"
        with RawClient(b.port) as over:
            frames = over.expect_closed()
        assert frames[-1].message == "limit: too many connections (limit 36)"
        closed = b.log().count(" closed 127.0.0.1")
        conns.pop().close()
        deadline = time.monotonic() + 5
        while b.log().count(" closed 127.0.0.1") == closed and time.monotonic() < deadline:
            time.sleep(0.02)
        with RawClient(b.port) as again:  # a descriptor is free again: served
            again.auth("alice", "alice-secret")
            again.subscribe("chan1")
            again.publish("chan1", b"served")
            assert again.messages(1)[0].payload == b"served"
    finally:
        for c in conns:
            c.close()
        assert b.stop() == 0
