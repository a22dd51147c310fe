"""A reconnect storm waits in the kernel's listen queues, not in SYN retransmits.

The loop accepts one connection per listener per turn (libuv), so the broker
listens on ``LISTENERS_PER_ENDPOINT`` sockets of one SO_REUSEPORT group: a
storm larger than one queue (``net.core.somaxconn``) is held whole while the
broker is busy, instead of its overflow being retried a second later."""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
import socket
import time
from pathlib import Path

import pytest

from hpfeeds3.broker.config import ConfigError, Endpoint
from hpfeeds3.broker.server import bind_sockets
from hpfeeds3.broker.tuning import LISTENERS_PER_ENDPOINT
from tests.support.broker import launch_broker

SETTLE_S = 10.0


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def test_an_endpoint_listens_on_one_port_with_several_queues() -> None:
    socks = bind_sockets(Endpoint(kind="tcp", host="127.0.0.1", port=0))
    try:
        assert len(socks) == LISTENERS_PER_ENDPOINT > 1
        assert len({s.getsockname() for s in socks}) == 1, "one port for all"
        # Another process's listener on that port is refused, as a plain bind would be.
        with pytest.raises(ConfigError, match="address already in use"):
            bind_sockets(Endpoint(kind="tcp", host="127.0.0.1", port=socks[0].getsockname()[1]))
    finally:
        for s in socks:
            s.close()


def test_a_port_someone_listens_on_is_refused_even_with_reuseport() -> None:
    """A second broker on the port (which sets SO_REUSEPORT too) does not share it."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="address already in use"):
            bind_sockets(Endpoint(kind="tcp", host="127.0.0.1", port=taken.getsockname()[1]))


def test_a_storm_larger_than_one_listen_queue_waits_whole_while_the_broker_is_busy(tmp_path: Path) -> None:
    """The broker stopped (SIGSTOP: a loop busy for seconds), somaxconn + 1,000 sensors
    connect: every one completes its TCP handshake into a queue; none is dropped to be
    retried by its kernel a second later."""
    queue = somaxconn()
    n = queue + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 200:
        pytest.skip(f"open-files limit {hard} below {n + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 200), hard))
    broker = launch_broker(tmp_path, "--auth", "env", "--max-connections", str(2 * n))
    sockets: list[socket.socket] = []
    try:
        broker.proc.send_signal(signal.SIGSTOP)
        for i in range(n):
            s = socket.socket()
            sockets.append(s)
            s.setblocking(False)
            # From many addresses, as sensors are: the kernel spreads them over the queues by hash.
            s.bind((f"127.2.{1 + (i >> 8) % 250}.{i & 255 or 1}", 0))
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", broker.port))
        deadline = time.monotonic() + SETTLE_S
        pending = sockets
        while pending and time.monotonic() < deadline:
            time.sleep(0.1)
            pending = [
                s for s in pending if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and not _connected(s)
            ]
        assert not pending, f"{len(pending)} of {n} connections not completed into a listen queue of {queue}"
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        for s in sockets:
            s.close()
        broker.stop()


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
    except OSError as e:
        assert e.errno == errno.ENOTCONN
        return False
    return True
