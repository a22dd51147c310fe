"""SIGTERM: the broker stops accepting, reports ``/healthz`` 503 ``stopping``,
flushes what it had queued for live subscribers within ``--shutdown-drain``,
closes every connection with reason ``shutdown`` and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from hpfeeds3.protocol import Publish, encode_publish
from tests.support.broker import RawClient, confirm_subscribed, free_port

from .support import http_get

SEQ = struct.Struct(">I")
MESSAGES = 12_000
PAYLOAD = 1024  # 12 MiB: more than the kernel buffers hold, below the 32 MiB bound


def queued_for(exporter: int, ident: str) -> float:
    _, body = http_get(f"http://127.0.0.1:{exporter}/metrics")
    m = re.search(rf'^hpfeeds_broker_connection_send_buffer_size{{ident="{ident}"}} (\S+)$', body.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def test_sigterm_drains_queued_output_refuses_new_connections_and_reports_stopping(start_broker) -> None:
    exporter = free_port()
    b = start_broker("--exporter", f"127.0.0.1:{exporter}", "--shutdown-drain", "15", "--send-stall-timeout", "60")
    # A subscriber that does not read yet: a small receive window, so output queues in the broker.
    reader = RawClient(b.port, rcvbuf=4096)
    reader.auth("reader", "reader-secret")
    reader.subscribe("chan1")
    with RawClient(b.port) as pub:
        pub.auth("alice", "alice-secret")
        confirm_subscribed(pub, "chan1", reader)
        pub.send(b"".join(encode_publish(b"alice", b"chan1", SEQ.pack(i) + bytes(PAYLOAD)) for i in range(MESSAGES)))
        deadline = time.monotonic() + 20
        while queued_for(exporter, "reader") < 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.1)
        queued = queued_for(exporter, "reader")
        assert queued >= 1024 * 1024, "output never queued for the subscriber"

        b.proc.send_signal(signal.SIGTERM)
        b.wait_log("shutting down")
        status, body = http_get(f"http://127.0.0.1:{exporter}/healthz")
        refused = False
        try:
            with socket.create_connection(("127.0.0.1", b.port), timeout=2) as late:
                late.settimeout(2)
                refused = late.recv(4096) == b""
        except OSError:
            refused = True

        # Now read: every queued message arrives, in order, then the close.
        seqs: list[int] = []
        while True:
            try:
                frame = reader.next_frame(timeout=20)
            except ConnectionError:
                break
            assert isinstance(frame, Publish), frame
            seqs.append(SEQ.unpack_from(frame.payload)[0])
    rc = b.proc.wait(20)
    reader.close()
    log = b.log()
    assert status == 503 and json.loads(body)["status"] == "stopping", (status, body)
    assert refused, "a connection was accepted after SIGTERM"
    assert seqs == list(range(MESSAGES)), f"{len(seqs)} of {MESSAGES} delivered"
    assert re.search(r"closed 127\.0\.0\.1:\d+ \(reader\): shutdown", log), log[-2000:]
    assert rc == 0
    assert "broker stopped" in log


# --- an orderly stop says nothing alarming ------------------------------------------


def _warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", line)]


def _serving(broker, count: int) -> None:
    deadline = time.monotonic() + 60
    while broker.log().count("serving") < count:
        assert time.monotonic() < deadline and broker.proc.poll() is None, broker.log()
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("workers", "how"),
    [(1, "SIGTERM"), (2, "SIGTERM"), (2, "SIGINT to the group")],
    ids=["cluster-sigterm", "workers-sigterm", "workers-ctrl-c"],
)
def test_clean_stop_of_a_cluster_broker_logs_no_warning(tmp_path: Path, workers: int, how: str) -> None:
    # SIGINT to the whole process group is Ctrl-C at a terminal (and what
    # systemd's default KillMode=control-group does with SIGTERM): the
    # workers get it at the same time as the supervisor.
    from tests.support.nats import NatsServer

    from .support import BROKER, BrokerProcess

    nats = NatsServer(tmp_path).start()
    try:
        argv = [str(BROKER), "--bind", f"127.0.0.1:{free_port()}", "--auth", "sqlite:" + str(tmp_path / "k.db"),
                "--cluster", nats.url]  # fmt: skip
        if workers > 1:
            argv += ["--workers", str(workers)]
        broker = BrokerProcess(argv, tmp_path, new_session=True)
        try:
            _serving(broker, workers)
            broker.wait_log("linked to NATS", timeout=30)
            deadline = time.monotonic() + 30
            while broker.log().count("linked to NATS") < workers:
                assert time.monotonic() < deadline, broker.log()
                time.sleep(0.05)
            if how == "SIGTERM":
                broker.proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(broker.proc.pid, signal.SIGINT)
            assert broker.stop() == 0, broker.log()
        finally:
            broker.kill_group()
        log = broker.log()
    finally:
        nats.stop()
    assert log.count("broker stopped") == workers, log
    assert not _warnings(log), "\n".join(_warnings(log))
