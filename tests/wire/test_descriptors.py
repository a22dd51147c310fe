"""Running out of file descriptors: the broker backs off instead of spinning."""

from __future__ import annotations

import contextlib
import resource
import socket
import time

import psutil

from tests.support.broker import RawClient


def test_accept_without_descriptors_backs_off_and_recovers(start_broker) -> None:
    b = start_broker()
    proc = psutil.Process(b.proc.pid)
    in_use = proc.num_fds()
    # Leave the broker a handful of descriptors, then flood it with connections.
    soft, hard = resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, (in_use + 5, hard))
    socks = []
    for _ in range(60):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection(("127.0.0.1", b.port), timeout=1))
    cpu_before = sum(proc.cpu_times()[:2])
    log_before = len(b.log())
    time.sleep(2.0)
    cpu_spent = sum(proc.cpu_times()[:2]) - cpu_before
    log_growth = len(b.log()) - log_before
    assert cpu_spent < 0.5, f"broker burnt {cpu_spent:.2f} s of CPU in 2 s while out of descriptors"
    assert log_growth < 50_000, f"{log_growth} bytes of log in 2 s"
    for s in socks:
        s.close()
    resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 10
    while True:
        try:
            with RawClient(b.port, timeout=2) as c:
                c.auth("alice", "alice-secret")
                c.subscribe("chan1")
                c.publish("chan1", b"recovered")
                assert c.messages(1)[0].payload == b"recovered"
                break
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
