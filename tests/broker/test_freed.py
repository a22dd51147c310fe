"""A closed connection is freed by reference counting, whatever closed it.

A reference cycle through a connection (session <-> connection, transport
<-> protocol) would leave every closed connection, with its transport,
decoder and counters, to the cyclic GC, whose full passes walk every live
connection: in a reconnect storm that cost more than the handshakes.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from hpfeeds3.broker.connection import Connection
from hpfeeds3.broker.session import Session

from ..support.broker import RawClient
from .test_internal_errors import broker_in_thread


def test_closed_connections_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    gc.collect()
    gc.disable()  # nothing collected behind the test's back: cycles stay until the check
    try:
        with broker_in_thread(tmp_path) as (broker, port):
            with RawClient(port) as sub:  # a subscriber that closes
                sub.auth("alice", "a")
                sub.subscribe("chan1")
                with RawClient(port) as pub:  # a publisher that closes
                    pub.auth("alice", "a")
                    pub.publish("chan1", b"x")
                    sub.messages(1)
            with RawClient(port) as bad:  # closed by the broker after an ERROR
                bad.auth("alice", "wrong")
                bad.expect_error()
            with RawClient(port) as silent:  # never authenticates
                silent.read_info()
            deadline = time.monotonic() + 10
            while broker.connections and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not broker.connections
            # Lingering closes finish: until no connection is alive (bounded: one
            # kept alive by a cycle stays, and the check below names it).
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(isinstance(o, Connection | Session) for o in gc.get_objects()):
                time.sleep(0.02)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, Connection | Session)]
            gc.set_debug(0)
            gc.garbage.clear()
            assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
