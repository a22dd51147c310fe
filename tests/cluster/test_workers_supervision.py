"""``--workers N``, supervised: a worker that dies is restarted, a worker that
fails while starting stops everything with its exit status."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import USERS
from tests.support.broker import BrokerProcess, auth_reply, free_port, free_ports, wait_for_port, write_users_json
from tests.support.nats import NatsServer


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path).start()
    yield server
    server.stop()


def workers(tmp_path: Path, n: int, exporter: int, nats_url: str) -> BrokerProcess:
    write_users_json(tmp_path / "users.json", USERS)
    port = free_port()
    argv = ["--bind", f"127.0.0.1:{port}", "--auth", "users.json", "--workers", str(n)]
    argv += ["--cluster", nats_url, "--exporter", f"127.0.0.1:{exporter}"]
    return BrokerProcess(argv, cwd=tmp_path, port=port)


def started_pids(b: BrokerProcess) -> list[tuple[int, int]]:
    """(worker index, pid) of every "worker I started (pid P)" line, in order."""
    return [(int(i), int(p)) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", b.log())]


def test_a_dead_worker_is_restarted(tmp_path: Path, nats: NatsServer) -> None:
    exporter = free_ports(2)
    b = workers(tmp_path, 2, exporter, nats.url)
    try:
        wait_for_port(b.port, proc=b.proc)
        wait_for_port(exporter + 1, proc=b.proc)
        (_, first), (_, second) = started_pids(b)
        os.kill(first, signal.SIGKILL)
        b.wait_log("worker 0 exited with -9; restarting in 1 s")
        deadline = time.monotonic() + 15
        while len(started_pids(b)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started_pids(b)[2:] == [(0, started_pids(b)[2][1])] and started_pids(b)[2][1] not in (first, second)
        wait_for_port(exporter, proc=b.proc)  # worker 0's exporter again: it is serving
        for _ in range(4):  # the kernel spreads new connections over both workers
            assert auth_reply(b.port, "alice", "alice-secret") == "ok"
    finally:
        assert b.stop() == 0


def test_a_worker_that_fails_to_start_stops_them_all_with_its_status(tmp_path: Path, nats: NatsServer) -> None:
    exporter = free_ports(2)
    with socket.socket() as taken:  # worker 1's exporter port (PORT + 1) is in use
        taken.bind(("127.0.0.1", exporter + 1))
        taken.listen()
        b = workers(tmp_path, 2, exporter, nats.url)
        try:
            rc = b.proc.wait(30)
        finally:
            b.stop()
    log = b.log()
    assert rc == 1, log[-3000:]
    assert "worker 1 failed to start (exit 1); stopping" in log
    assert f"--exporter 127.0.0.1:{exporter + 1}: cannot listen" in log
    assert "all workers stopped" in log


def test_start_up_failure_exits_1_while_nats_is_unreachable(tmp_path: Path) -> None:
    """The link task is then retrying its first connection: stopping must not wait for NATS."""
    exporter = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", exporter))
        taken.listen()
        port = free_port()
        argv = ["--bind", f"127.0.0.1:{port}", "--auth", "env", "--cluster", f"nats://127.0.0.1:{free_port()}"]
        b = BrokerProcess([*argv, "--exporter", f"127.0.0.1:{exporter}"], cwd=tmp_path, port=port)
        try:
            rc = b.proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            b.stop(signal.SIGKILL)
    assert rc == 1, b.log()[-2000:]
