"""One guarded boundary: every asyncio callback and timer target of a Connection.

Faults are injected into a real in-process broker (raw-socket clients): a bug
in any entry point closes that connection alone with ``internal_error``; the
subscriber's hard bound holds whatever its backlog timer does; the broker's
per-connection loops (revocation, shutdown, partial-frame accounting) isolate
each connection. A source check enumerates the Protocol methods, the timer
targets and the tasks of every module that holds a connection's code
(``connection.py``, ``boundary.py`` where its timers are scheduled, and the
parts kept in their own modules: ``tls.TlsPump``,
``keylookup``, ``partial.PartialFrameWatch``, ``backlog.BacklogWatch``,
``linger.LingeringClose``, ``heldback.HeldBack``, ``durable.feed.ConnectionFeed``)
and fails if one is not wrapped, or if a module uses ``Connection`` without
being enumerated.
"""

from __future__ import annotations

import ast
import asyncio
import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import trustme

import hpfeeds3.broker as broker_package
import hpfeeds3.broker.connection as connection_module
import hpfeeds3.broker.state as state_module
from hpfeeds3.broker import metrics
from hpfeeds3.broker.auth import WouldBlock
from hpfeeds3.broker.backlog import BacklogWatch
from hpfeeds3.broker.boundary import Guarded
from hpfeeds3.broker.config import BrokerConfig, Limits
from hpfeeds3.broker.connection import Connection
from hpfeeds3.broker.durable.feed import DurableFeed
from hpfeeds3.broker.linger import LingeringClose
from hpfeeds3.broker.policies import ReceiveRate
from hpfeeds3.broker.session import Session
from hpfeeds3.broker.state import Broker
from hpfeeds3.broker.tls import TlsPump

from ..support.broker import RawClient, write_users_json
from ..support.inprocess import serving_in_thread
from .test_internal_errors import ERROR_TEXT, broker_in_thread, closed_internal, confirmed_subscriber, counted

MiB = 1024 * 1024
PROTOCOL_METHODS = (
    "connection_made",
    "data_received",
    "eof_received",
    "connection_lost",
    "pause_writing",
    "resume_writing",
)


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _conn_of(broker: Broker, ident: str) -> list[Connection]:
    return [c for c in list(broker.connections) if c.session.ident == ident]


def _stalled_subscriber(broker: Broker, port: int) -> RawClient:
    """``bad`` subscribed to chan1 with a 4 KiB receive window, never reading."""
    stalled = RawClient(port, rcvbuf=4096).auth("bad", "b")
    stalled.subscribe("chan1")
    assert _wait(lambda: any(b"chan1" in c.session.subscriptions for c in _conn_of(broker, "bad")))
    return stalled


def _open(broker: Broker, ident: str) -> list[Connection]:
    """``ident``'s connections not closed yet (a closed one may linger a moment)."""
    return [c for c in _conn_of(broker, ident) if c.session.close_reason is None]


def _flood_until_gone(broker: Broker, port: int, ident: str, limit_bytes: int, watched: threading.Event) -> int:
    """Publish 64 KiB messages on chan1 until ``ident``'s connection is gone or
    ``limit_bytes`` were published; returns the bytes published. First a backlog
    (over the transport's high-water mark, under the hard bound) until the
    backlog watch has run once (``watched``)."""
    payload = b"x" * 65536
    sent = 0
    with RawClient(port).auth("alice", "a") as pub:
        while not watched.wait(0.02):
            assert sent < 12 * MiB, "the backlog watch never ran"
            pub.publish("chan1", payload)
            sent += len(payload)
        while _open(broker, ident) and sent < limit_bytes:
            pub.publish("chan1", payload)
            sent += len(payload)
            if sent % (1 * MiB) == 0:
                time.sleep(0.01)  # let the broker's loop run the timers
        _wait(lambda: not _open(broker, ident), 5.0)
    return sent


def test_a_fault_in_the_backlog_watch_does_not_lift_the_hard_bound(tmp_path, monkeypatch) -> None:
    """The watch fails after clearing its timer: the subscriber is closed, not left
    open with its queue growing past the hard bound."""

    watched = threading.Event()

    def faulty_watch(self: BacklogWatch) -> None:
        self._timer = None  # as the real check does first
        watched.set()
        raise RuntimeError("injected fault in the backlog watch")

    monkeypatch.setattr(BacklogWatch, "_check", faulty_watch)
    limits = Limits(send_buffer_hard_bytes=16 * MiB, send_buffer_soft_bytes=1000, shutdown_drain_s=0.5)
    with broker_in_thread(tmp_path, limits) as (broker, port):
        stalled = _stalled_subscriber(broker, port)
        sent = _flood_until_gone(broker, port, "bad", 60 * MiB, watched)
        assert not _open(broker, "bad"), f"subscriber still open after {sent} bytes over a 16 MiB hard bound"
        stalled.close()


def test_the_hard_bound_holds_when_the_backlog_watch_never_runs_again(tmp_path, monkeypatch) -> None:
    """A watch that stops itself without a fault (a bug that returns early): the
    hard bound is checked at every delivery all the same."""

    watched = threading.Event()

    def silent_watch(self: BacklogWatch) -> None:
        self._timer = None
        watched.set()

    monkeypatch.setattr(BacklogWatch, "_check", silent_watch)
    before = metrics.CONNECTIONS_CLOSED.counts.get("slow_consumer", 0)
    limits = Limits(send_buffer_hard_bytes=16 * MiB, shutdown_drain_s=0.5)
    with broker_in_thread(tmp_path, limits) as (broker, port):
        stalled = _stalled_subscriber(broker, port)
        sent = _flood_until_gone(broker, port, "bad", 60 * MiB, watched)
        assert not _open(broker, "bad"), f"subscriber still open after {sent} bytes over a 16 MiB hard bound"
        assert sent < 40 * MiB
        assert _wait(lambda: metrics.CONNECTIONS_CLOSED.counts.get("slow_consumer", 0) == before + 1)
        stalled.close()


class _Faulty:
    """A metric family whose child raises: a fault inside a callback's own code."""

    def __init__(self, what: str) -> None:
        self.what = what

    def labels(self, *args: object) -> object:
        raise RuntimeError(f"injected fault in {self.what}")


def test_a_fault_in_pause_writing_closes_that_subscriber_alone(tmp_path, monkeypatch) -> None:
    limits = Limits(send_buffer_hard_bytes=16 * MiB, shutdown_drain_s=0.5)
    with broker_in_thread(tmp_path, limits) as (broker, port):
        good = confirmed_subscriber(port, "alice", "a")
        stalled = _stalled_subscriber(broker, port)
        monkeypatch.setattr(metrics, "SEND_BUFFER_DEADLINE_START", _Faulty("pause_writing"))
        before = closed_internal()
        payload = b"y" * 65536
        sent = 0
        with RawClient(port).auth("alice", "a") as pub:
            while _open(broker, "bad") and sent < 60 * MiB:
                pub.publish("chan1", payload)
                sent += len(payload)
                assert good.messages(1)[0].payload == payload  # the good one keeps up
        assert not _open(broker, "bad"), f"subscriber still open after {sent} bytes over a 16 MiB hard bound"
        assert sent < 40 * MiB
        assert counted(before + 1)
        good.close()
        stalled.close()


def test_a_fault_in_connection_made_closes_that_connection_alone(tmp_path, monkeypatch) -> None:
    with broker_in_thread(tmp_path) as (broker, port):
        sub = confirmed_subscriber(port, "alice", "a")
        before = closed_internal()
        escaped: list[dict[str, object]] = []  # what reached the event loop's exception handler
        broker.loop.set_exception_handler(lambda loop, context: escaped.append(context))
        monkeypatch.setattr(connection_module, "address_groups", _raise("connection_made"))
        with RawClient(port) as victim:
            victim.sock.settimeout(5)
            frames = victim.expect_closed()
            assert [getattr(f, "message", None) for f in frames][-1:] == [ERROR_TEXT]
        assert counted(before + 1)
        assert escaped == []  # the boundary kept the fault from the loop
        monkeypatch.undo()
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("chan1", b"still")
            assert sub.messages(1)[0].payload == b"still"
        assert _wait(lambda: len(broker.connections) == 1)  # the victim left no trace
        sub.close()


def _raise(what: str):
    def fault(*args: object, **kwargs: object) -> object:
        raise RuntimeError(f"injected fault in {what}")

    return fault


def test_recheck_isolates_each_connection(tmp_path, monkeypatch) -> None:
    """A fault while applying a key change to one connection closes it alone; the
    others of the same ident are still re-checked."""
    with broker_in_thread(tmp_path) as (broker, port):
        subs = [confirmed_subscriber(port, "alice", "a") for _ in range(3)]
        assert _wait(lambda: len(_conn_of(broker, "alice")) == 3)  # the probes are gone
        conns = _conn_of(broker, "alice")
        victim = conns[0]
        real = Session.apply_key

        def faulty_apply(self: Session, key):  # type: ignore[no-untyped-def]
            if self is victim.session:
                raise RuntimeError("injected fault in a recheck")
            return real(self, key)

        monkeypatch.setattr(Session, "apply_key", faulty_apply)
        before = closed_internal()
        done = asyncio.run_coroutine_threadsafe(broker.recheck({"alice"}), broker.loop)
        done.result(10)  # the fault does not escape the recheck
        assert counted(before + 1)
        assert victim not in broker.connections
        assert all(c in broker.connections for c in conns[1:])
        for s in subs:
            s.close()


def test_drain_and_close_isolates_each_connection(tmp_path, monkeypatch) -> None:
    with broker_in_thread(tmp_path) as (broker, port):
        subs = [confirmed_subscriber(port, "alice", "a") for _ in range(3)]
        assert _wait(lambda: len(_conn_of(broker, "alice")) == 3)  # the probes are gone
        victim = _conn_of(broker, "alice")[0]
        real = Connection.write_buffer_size

        def faulty_size(self: Connection) -> int:
            if self is victim:
                raise RuntimeError("injected fault in shutdown")
            return real(self)

        monkeypatch.setattr(Connection, "write_buffer_size", faulty_size)
        done = asyncio.run_coroutine_threadsafe(broker.drain_and_close(0.2), broker.loop)
        done.result(10)
        assert _wait(lambda: not broker.connections)
        for s in subs:
            assert s.expect_closed(5) is not None
            s.close()


def _fail_to_close(monkeypatch, victim: Connection, what: str) -> None:
    """``victim.close`` raises; every other connection closes as usual."""
    real = Connection.close

    def faulty_close(self: Connection, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self is victim:
            raise RuntimeError(f"injected fault in {what}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "close", faulty_close)


def test_hold_partial_isolates_each_connection(tmp_path, monkeypatch) -> None:
    """Past the partial-frame bound the largest holder is closed; a fault while
    closing it closes it alone (internal_error), not the connection whose read
    went over the bound."""
    limits = Limits(max_partial_frames_bytes=100_000, shutdown_drain_s=0.5)
    header = struct.pack(">IB", 200_000, 3)  # a PUBLISH declaring 200,000 bytes
    with broker_in_thread(tmp_path, limits) as (broker, port):
        first = RawClient(port).auth("alice", "a")
        first.send(header + b"\x05alice" + b"z" * 60_000)
        assert _wait(lambda: broker.partial_bytes >= 60_000)
        victim = next(iter(broker.partial_holders))
        _fail_to_close(monkeypatch, victim, "closing a holder")
        before = closed_internal()
        second = RawClient(port).auth("alice", "a")
        second.send(header + b"\x05alice" + b"z" * 50_000)
        assert counted(before + 1)
        assert _wait(lambda: victim not in broker.connections)
        assert len(_conn_of(broker, "alice")) == 1  # the second holder is within the bound: still open
        assert broker.partial_bytes <= 100_000
        first.close()
        second.close()


def test_a_fault_while_evicting_closes_the_evicted_connection_alone(tmp_path, monkeypatch) -> None:
    """At the per-address pre-auth bound the oldest is closed to admit the newcomer;
    a fault while closing it closes that one (internal_error), not the newcomer."""
    limits = Limits(max_unauthenticated_per_address=2, shutdown_drain_s=0.5)
    with broker_in_thread(tmp_path, limits) as (broker, port):
        oldest = RawClient(port)
        oldest.read_info()
        second = RawClient(port)
        second.read_info()
        assert _wait(lambda: len(broker.connections) == 2)
        victim = min(broker.connections, key=lambda c: c.id)
        _fail_to_close(monkeypatch, victim, "evicting")
        before = closed_internal()
        with RawClient(port) as newcomer:
            newcomer.read_info()
            assert counted(before + 1)
            assert victim not in broker.connections
            newcomer.auth("alice", "a")
            newcomer.publish("chan1", b"in")  # served: not closed by the fault
            assert _wait(lambda: any(c.session.ident == "alice" for c in list(broker.connections)))
        for c in (oldest, second):
            c.close()


def test_a_fault_in_the_linger_timer_still_ends_the_lingering_connection(tmp_path, monkeypatch) -> None:
    """The end of a linger after a closing ERROR (a linger.LingeringClose timer target)
    raises: the connection, closed already, is ended all the same; the others are served."""
    monkeypatch.setattr(LingeringClose, "_end", _raise("the end of a linger"))
    with broker_in_thread(tmp_path) as (broker, port):
        sub = confirmed_subscriber(port, "alice", "a")
        assert _wait(lambda: len(broker.connections) == 1)  # the probe is gone
        with RawClient(port).auth("alice", "wrong") as bad:  # read its ERROR, never closes
            bad.expect_error()
            assert _wait(lambda: len(broker.connections) == 1), "the lingering connection stayed open"
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("chan1", b"still")
            assert sub.messages(1)[0].payload == b"still"
        sub.close()


def test_a_fault_in_the_receive_deadline_timer_closes_that_connection_alone(tmp_path, monkeypatch) -> None:
    """A timer target (the receive-rate deadline) that raises: internal_error for
    its connection, the others served."""
    monkeypatch.setattr(state_module, "PARTIAL_FRAME_GRACE_S", 0.2)
    monkeypatch.setattr(ReceiveRate, "error", _raise("the receive deadline"))
    with broker_in_thread(tmp_path) as (_broker, port):
        sub = confirmed_subscriber(port, "alice", "a")
        before = closed_internal()
        with RawClient(port).auth("alice", "a") as trickler:
            trickler.send(struct.pack(">IB", 1000, 3) + b"\x05alice")  # a frame begun, never finished
            assert [getattr(f, "message", None) for f in trickler.expect_closed(10)] == [ERROR_TEXT]
        assert counted(before + 1)
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("chan1", b"still")
            assert sub.messages(1)[0].payload == b"still"
        sub.close()


def test_a_fault_in_a_key_lookup_task_closes_that_connection_alone(tmp_path, monkeypatch) -> None:
    """A store that cannot answer at once is asked in a task (keylookup): a fault in
    that task closes the connection that asked, and the broker serves the others."""
    with broker_in_thread(tmp_path) as (_broker, port):
        sub = confirmed_subscriber(port, "alice", "a")
        before = closed_internal()

        def would_block(self: Broker, ident: str) -> None:
            raise WouldBlock

        async def faulty_lookup(self: Broker, ident: str) -> None:
            raise RuntimeError("injected fault in a key lookup task")

        monkeypatch.setattr(Broker, "lookup_now", would_block)
        monkeypatch.setattr(Broker, "lookup", faulty_lookup)
        with RawClient(port).auth("alice", "a") as victim:
            assert [getattr(f, "message", None) for f in victim.expect_closed()] == [ERROR_TEXT]
        assert counted(before + 1)
        monkeypatch.undo()
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("chan1", b"still")
            assert sub.messages(1)[0].payload == b"still"
        sub.close()


def test_a_fault_in_the_tls_handshake_deadline_closes_that_connection_alone(tmp_path, monkeypatch) -> None:
    """The TLS handshake's deadline (a TlsPump timer target) raises: the silent socket
    is closed with internal_error, and TLS clients are served."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    keys = write_users_json(tmp_path / "keys.json", {"alice": {"secret": "a", "pubchans": ["c"], "subchans": ["c"]}})
    limits = Limits(tls_handshake_timeout_s=0.3, shutdown_drain_s=0.5)
    monkeypatch.setattr(TlsPump, "failed", _raise("the TLS handshake deadline"))
    config = BrokerConfig(auth=(str(keys),), limits=limits)
    with serving_in_thread(config, tls_pem=str(pem)) as (_broker, port):
        sub = RawClient(port, tls=client_tls).auth("alice", "a")
        sub.subscribe("c")
        before = closed_internal()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:  # never starts a handshake
            assert silent.recv(1) == b""  # closed (aborted: no ERROR before a handshake)
        assert counted(before + 1)
        with RawClient(port, tls=client_tls).auth("alice", "a") as pub:
            pub.publish("c", b"still")
            assert sub.messages(1)[0].payload == b"still"
        sub.close()


def test_a_fault_in_a_durable_connections_sampling_timer_closes_it_alone(tmp_path, monkeypatch) -> None:
    """A durable key's acknowledgements are sampled on a timer (durable.feed.ConnectionFeed):
    a fault there closes that connection alone; a live subscriber is served."""
    keys = tmp_path / "keys.json"  # (write_users_json knows no durable keys)
    keys.write_text(
        json.dumps(
            {
                "alice": {"owner": "o", "secret": "a", "pubchans": ["c"], "subchans": ["c"]},
                "col": {"owner": "o", "secret": "c", "pubchans": [], "subchans": ["c"], "durable": True},
            }
        )
    )
    monkeypatch.setattr(DurableFeed, "sample", _raise("sampling a durable connection"))
    config = BrokerConfig(auth=(str(keys),), data_dir=str(tmp_path / "data"), durable=True)
    with serving_in_thread(config) as (broker, port):
        sub = RawClient(port).auth("alice", "a")
        sub.subscribe("c")
        before = closed_internal()
        with RawClient(port).auth("col", "c") as durable:
            assert [getattr(f, "message", None) for f in durable.expect_closed()] == [ERROR_TEXT]
        assert counted(before + 1)
        assert broker.durable is not None
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("c", b"still")
            assert sub.messages(1)[0].payload == b"still"
        sub.close()


# Modules whose code runs as part of one connection: its callbacks, timer targets and tasks.
CONNECTION_MODULES = {
    "hpfeeds3.broker.connection",
    "hpfeeds3.broker.boundary",  # Guarded: the timers' helpers and internal_error (Connection's base)
    "hpfeeds3.broker.tls",  # TlsPump
    "hpfeeds3.broker.backlog",  # BacklogWatch
    "hpfeeds3.broker.linger",  # LingeringClose
    "hpfeeds3.broker.heldback",  # HeldBack
    "hpfeeds3.broker.keylookup",
    "hpfeeds3.broker.partial",  # PartialFrameWatch
    "hpfeeds3.broker.durable.feed",  # ConnectionFeed
}
# Modules that reach connections from outside: the broker's own timers and per-connection
# loops (isolated by the tests above), the composition root.
BROKER_WIDE = {"hpfeeds3.broker.state", "hpfeeds3.broker.server"}
SCHEDULERS = ("call_later", "call_soon", "call_at", "call_soon_threadsafe", "create_task", "ensure_future")


def _broker_modules() -> dict[str, ast.Module]:
    root = Path(broker_package.__file__).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(("hpfeeds3.broker", *parts)).removesuffix(".__init__")
        modules[name] = ast.parse(path.read_text())
    return modules


def _imports_connection(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and (node.module or "").endswith("connection")
        and any(alias.name == "Connection" for alias in node.names)
        for node in ast.walk(tree)
    )


def test_every_module_with_a_connections_code_is_enumerated() -> None:
    modules = _broker_modules()
    users = {name for name, tree in modules.items() if _imports_connection(tree)}
    assert users - BROKER_WIDE <= CONNECTION_MODULES, (
        f"not enumerated: {sorted(users - BROKER_WIDE - CONNECTION_MODULES)}"
    )
    assert CONNECTION_MODULES - {"hpfeeds3.broker.connection", "hpfeeds3.broker.boundary"} <= users
    assert modules.keys() >= CONNECTION_MODULES


def _catches_into_internal_error(func: ast.AsyncFunctionDef) -> bool:
    """The whole body is one ``try`` whose ``except Exception`` calls ``internal_error``."""
    if len(func.body) != 1 or not isinstance(func.body[0], ast.Try):
        return False
    return any(
        isinstance(handler.type, ast.Name)
        and handler.type.id == "Exception"
        and any(isinstance(node, ast.Attribute) and node.attr == "internal_error" for node in ast.walk(handler))
        for handler in func.body[0].handlers
    )


def test_every_protocol_method_and_timer_target_is_guarded() -> None:
    assert issubclass(Connection, Guarded)  # its parts' timers go through Guarded._call_later/_call_soon
    for name in PROTOCOL_METHODS:
        method = getattr(Connection, name)
        assert getattr(method, "__guarded__", None), f"Connection.{name} is not wrapped by the boundary"
    # Timers: every call_later / call_soon in a connection's modules is inside the
    # one helper that wraps its target; every task's coroutine catches into the boundary.
    modules = _broker_modules()
    allowed = {"_call_later", "_call_soon"}
    helpers = 0
    for name in sorted(CONNECTION_MODULES):
        for func in ast.walk(modules[name]):
            if isinstance(func, ast.AsyncFunctionDef):
                assert _catches_into_internal_error(func), f"{name}.{func.name}: a task outside the boundary"
            if not isinstance(func, ast.FunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SCHEDULERS:
                    assert name == "hpfeeds3.broker.boundary" and func.name in allowed, (
                        f"{name}.{func.name} schedules a timer outside the guarded helpers"
                    )
                    helpers += 1
    assert helpers == 2  # the helpers themselves were found: the scan sees the code
