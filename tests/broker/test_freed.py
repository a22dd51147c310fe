"""A closed connection is freed by reference counting, whatever closed it.

A reference cycle through a connection (session <-> connection, transport
<-> protocol) would leave every closed connection, with its transport,
decoder and counters, to the cyclic GC, whose full passes walk every live
connection: in a reconnect storm that cost more than the handshakes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import trustme

from hpfeeds3.broker.config import BrokerConfig, Limits
from hpfeeds3.broker.connection import Connection
from hpfeeds3.broker.session import Session
from hpfeeds3.broker.state import Broker

from ..support.broker import RawClient
from ..support.inprocess import serving_in_thread
from .test_guarded_boundary import MiB, _open, _stalled_subscriber
from .test_internal_errors import broker_in_thread


def _no_cyclic_garbage_once_closed(broker: Broker) -> None:
    """Every connection of ``broker`` gone, then no Connection or Session left in a cycle."""
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


@contextlib.contextmanager
def _gc_disabled() -> Iterator[None]:
    gc.collect()
    gc.disable()  # nothing collected behind the test's back: cycles stay until the check
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_closed_connections_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    with _gc_disabled(), broker_in_thread(tmp_path) as (broker, port):
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
        _no_cyclic_garbage_once_closed(broker)


def test_closed_tls_and_durable_connections_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    """The parts made for some connections only (tls.TlsPump, durable.feed.ConnectionFeed)
    point back at their connection: the close breaks that too."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "alice": {"owner": "o", "secret": "a", "pubchans": ["c"], "subchans": ["c"]},
                "col": {"owner": "o", "secret": "c", "pubchans": [], "subchans": ["c"], "durable": True},
            }
        )
    )
    config = BrokerConfig(auth=(str(keys),), data_dir=str(tmp_path / "data"), durable=True)
    with _gc_disabled(), serving_in_thread(config, tls_pem=str(pem)) as (broker, port):
        with RawClient(port, tls=client_tls) as col:  # a durable key's connection over TLS
            col.auth("col", "c")
            col.subscribe("c")
            with RawClient(port, tls=client_tls) as pub:
                pub.auth("alice", "a")
                pub.publish("c", b"x")
                assert col.messages(1)[0].payload == b"x"
        with RawClient(port, tls=client_tls) as bad:  # closed by the broker after an ERROR, over TLS
            bad.auth("alice", "wrong")
            bad.expect_error()
        _no_cyclic_garbage_once_closed(broker)


def test_a_slow_consumer_cut_while_watched_leaves_no_cyclic_garbage(tmp_path: Path) -> None:
    """A backlogged subscriber's watch (backlog.BacklogWatch) points back at its
    connection, and it is still there when the subscriber is cut: the close breaks that too."""
    limits = Limits(send_buffer_hard_bytes=4 * MiB, shutdown_drain_s=0.5)
    with _gc_disabled(), broker_in_thread(tmp_path, limits) as (broker, port):
        stalled = _stalled_subscriber(broker, port)
        payload = b"x" * 65536
        sent = 0
        with RawClient(port) as pub:
            pub.auth("alice", "a")
            while _open(broker, "bad") and sent < 40 * MiB:
                pub.publish("chan1", payload)
                sent += len(payload)
        assert not _open(broker, "bad"), f"the stalled subscriber was not cut after {sent} bytes"
        stalled.close()
        _no_cyclic_garbage_once_closed(broker)
