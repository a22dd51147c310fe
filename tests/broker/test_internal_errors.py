"""The internal-error boundary, with faults injected into a real broker.

The broker runs in-process (``serve`` on a thread with its own loop) so a
fault can be put into the router or a subscriber's delivery; clients are raw
sockets. A bug while handling one connection closes that connection alone
with ``internal_error`` (ERROR to the client, traceback in the log, counted);
everyone else is still served.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpfeeds3.broker import metrics
from hpfeeds3.broker.config import BrokerConfig, Limits
from hpfeeds3.broker.connection import Connection
from hpfeeds3.broker.router import Router
from hpfeeds3.broker.session import Session
from hpfeeds3.broker.state import Broker

from ..support.broker import RawClient, write_users_json
from ..support.inprocess import serving_in_thread

ERROR_TEXT = "internal: internal error; this connection is closed"


@contextlib.contextmanager
def broker_in_thread(tmp_path: Path, limits: Limits | None = None) -> Iterator[tuple[Broker, int]]:
    keys = write_users_json(
        tmp_path / "keys.json",
        {
            "alice": {"secret": "a", "pubchans": ["chan1", "boom"], "subchans": ["chan1"]},
            "bad": {"secret": "b", "pubchans": [], "subchans": ["chan1"]},
        },
    )
    config = BrokerConfig(auth=(str(keys),), limits=limits or Limits(shutdown_drain_s=0.5))
    with serving_in_thread(config) as served:
        yield served


def closed_internal() -> float:
    return metrics.CONNECTIONS_CLOSED.counts.get("internal_error", 0)


def counted(expected: float, timeout: float = 5.0) -> bool:
    """Closes are counted when the socket is gone (after the ERROR is read): wait for it, bounded."""
    deadline = time.monotonic() + timeout
    while closed_internal() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return closed_internal() == expected


def confirmed_subscriber(port: int, ident: str, secret: str) -> RawClient:
    """Subscribed to chan1, confirmed by a message published after the SUBSCRIBE."""
    sub = RawClient(port).auth(ident, secret)
    sub.subscribe("chan1")
    with RawClient(port).auth("alice", "a") as probe:
        probe.publish("chan1", b"probe")
        assert sub.messages(1)[0].payload == b"probe"
    return sub


def test_a_fault_while_publishing_closes_the_publisher_alone(tmp_path, monkeypatch, caplog) -> None:
    real_publish = Router.publish

    def faulty_publish(self: Router, channel: bytes, data: bytes, count: int) -> int:
        if channel == b"boom":
            raise RuntimeError("injected fault in the router")
        return real_publish(self, channel, data, count)

    monkeypatch.setattr(Router, "publish", faulty_publish)
    with broker_in_thread(tmp_path) as (_broker, port):
        sub = confirmed_subscriber(port, "alice", "a")
        before = closed_internal()
        with caplog.at_level(logging.ERROR, logger="hpfeeds3.broker.connection"):
            with RawClient(port).auth("alice", "a") as victim:
                victim.publish("boom", b"x")
                frames = victim.expect_closed()
            assert [f.message for f in frames] == [ERROR_TEXT]  # type: ignore[union-attr]
        assert "injected fault in the router" in caplog.text  # the traceback is logged
        assert counted(before + 1)
        # Everyone else is still served, and so is a new connection.
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("chan1", b"after")
            assert sub.messages(1)[0].payload == b"after"
        sub.close()


def test_a_subscriber_whose_delivery_fails_is_closed_and_the_others_still_receive(tmp_path, monkeypatch) -> None:
    real_deliver = Connection.deliver

    def faulty_deliver(self: Connection, data: bytes) -> None:
        if self.session.ident == "bad":
            raise RuntimeError("injected fault in a delivery")
        real_deliver(self, data)

    with broker_in_thread(tmp_path) as (_broker, port):
        good = confirmed_subscriber(port, "alice", "a")
        bad = confirmed_subscriber(port, "bad", "b")
        assert good.messages(1)[0].payload == b"probe"  # bad's confirmation reached good too
        monkeypatch.setattr(Connection, "deliver", faulty_deliver)
        before = closed_internal()
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("chan1", b"one")
            assert good.messages(1)[0].payload == b"one"
            assert [f.message for f in bad.expect_closed()] == [ERROR_TEXT]  # type: ignore[union-attr]
            # The publisher was not touched: it publishes again, and it arrives.
            pub.publish("chan1", b"two")
            assert good.messages(1)[0].payload == b"two"
        assert counted(before + 1)
        good.close()


def test_a_fault_in_a_timer_closes_that_connection_alone(tmp_path, monkeypatch) -> None:
    def faulty_timeout(self: Session, timeout_s: float) -> None:
        raise RuntimeError("injected fault in the AUTH deadline")

    monkeypatch.setattr(Session, "auth_timeout", faulty_timeout)
    with broker_in_thread(tmp_path, Limits(auth_timeout_s=0.3, shutdown_drain_s=0.5)) as (_broker, port):
        sub = confirmed_subscriber(port, "alice", "a")
        before = closed_internal()
        with RawClient(port) as silent:
            silent.read_info()
            assert [f.message for f in silent.expect_closed()] == [ERROR_TEXT]  # type: ignore[union-attr]
        assert counted(before + 1)
        with RawClient(port).auth("alice", "a") as pub:
            pub.publish("chan1", b"still")
            assert sub.messages(1)[0].payload == b"still"
        sub.close()


@pytest.fixture(autouse=True)
def _quiet_gc_freeze(monkeypatch) -> None:
    # serve() freezes the startup heap for the broker process; in a test
    # process that would pin every earlier test's garbage.
    import gc

    monkeypatch.setattr(gc, "freeze", lambda: None)
