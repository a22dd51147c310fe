"""SIGTERM: the broker stops accepting, reports ``/healthz`` 503 ``stopping``,
flushes what it had queued for live subscribers within ``--shutdown-drain``,
closes every connection with reason ``shutdown`` and exits 0."""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import time

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
