"""Authentications and closes are noted on the handshake path and counted later
(``Tracker.settle``): counted exactly, at the next poll or view, and never more
than ``SETTLE_AT`` waiting."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hpfeeds3.broker.admin import tracker as tracker_mod
from hpfeeds3.broker.admin.api import Console as ApiConsole
from hpfeeds3.broker.admin.tokens import TokenFile
from hpfeeds3.broker.admin.tracker import Tracker
from hpfeeds3.broker.events import Authenticated, Closed, Connected
from hpfeeds3.broker.metrics import PublishStats
from hpfeeds3.broker.reasons import CloseReason
from hpfeeds3.broker.state import Broker

from .conftest import write_tokens

T0 = 1_000_000 * 60.0


def handshake(t: Tracker, conn_id: int, ident: str, channel: bytes, published: int) -> None:
    """What one sensor's connection makes: connected, authenticated, closed with its counts."""
    peer = f"10.0.0.1:{conn_id}"
    stats = PublishStats()
    stats.count = published
    t.observe(Connected(peer, conn_id))
    t.observe(Authenticated(peer, conn_id, ident))
    t.observe(Closed(peer, conn_id, ident, CloseReason.CLIENT_CLOSED, {channel: stats}))


def primed(broker: Broker) -> Tracker:
    t = Tracker(broker)
    broker.loop.run_until_complete(t.poll(T0))  # the first poll: counts from now on
    return t


def test_closes_are_counted_exactly_once_settled(broker: Broker) -> None:
    t = primed(broker)
    for conn_id in range(1, 31):
        handshake(t, conn_id, f"sensor-{conn_id % 3}", b"c%d" % (conn_id % 2), 2)
    assert not t.pairs  # noted, not counted yet
    t.settle()
    minute = int(t.published["sensor-0"] // 60)
    # 30 connections over 3 idents and 2 channels, 2 messages each.
    assert sum(a.windows(minute)[0] for a in t.pairs.values()) == 60
    assert {ident: h.windows(minute)[0] for ident, h in t.idents.items()} == {f"sensor-{i}": 20 for i in range(3)}
    assert {ch: h.windows(minute)[0] for ch, h in t.chans.items()} == {"c0": 30, "c1": 30}
    assert set(t.last_seen) == {"sensor-0", "sensor-1", "sensor-2"}
    t.settle()  # nothing counted twice
    assert sum(a.windows(minute)[0] for a in t.pairs.values()) == 60


def test_a_poll_counts_what_was_noted(broker: Broker) -> None:
    t = primed(broker)
    handshake(t, 1, "sensor", b"c", 5)
    broker.loop.run_until_complete(t.poll())
    assert t.channels("sensor", int(t.published["sensor"] // 60))["c"]["last_5m"] == 5


def test_noted_closes_are_bounded_without_a_poll(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracker_mod, "SETTLE_AT", 10)
    t = primed(broker)
    for conn_id in range(1, 101):
        handshake(t, conn_id, f"sensor-{conn_id}", b"c", 1)
        assert len(t._pending) < 10 and len(t._arrived) < 10
    t.settle()
    assert t.chans["c"].windows(int(t.published["sensor-1"] // 60))[0] == 100
    assert len(t.idents) == 100


def test_a_view_read_before_the_next_poll_shows_the_noted_closes(broker: Broker, tmp_path: Path) -> None:
    """The console's views settle first: a sensor that connected, published and left a
    moment ago is on the page at once, not up to a poll later."""
    admin, _ = write_tokens(tmp_path / "tokens.txt")
    console = ApiConsole(broker, TokenFile(str(tmp_path / "tokens.txt")), secure_cookie=False)
    console.tracker._primed = True  # as after the first poll; no poll runs in this test
    handshake(console.tracker, 1, "cowrie-eu-01", b"honeypot.events", 4)

    async def read() -> dict:
        async with TestClient(TestServer(console.app())) as client:
            resp = await client.get("/api/v1/sensors", headers={"Authorization": f"Bearer {admin}"})
            assert resp.status == 200
            return await resp.json()

    body = broker.loop.run_until_complete(read())
    row = next(r for r in body["sensors"] if r["ident"] == "cowrie-eu-01")
    assert row["last_seen"] is not None and row["last_5m"] == 4


def test_nothing_of_a_closed_connection_is_kept_until_the_settle(broker: Broker) -> None:
    """A close is summed at once: its event and publish counters are freed with the
    connection (by reference counting), not kept for the cyclic GC to scan until the
    next poll, as every handshake with the console open once was."""

    class Published(dict):  # a dict that a weak reference can follow
        pass

    t = primed(broker)
    stats = PublishStats()
    stats.count = 3
    published = Published({b"c": stats})
    freed = weakref.ref(published)
    t.observe(Closed("10.0.0.1:1", 1, "sensor", CloseReason.CLIENT_CLOSED, published))
    del published
    assert freed() is None
    t.settle()
    assert t.idents["sensor"].windows(int(t.published["sensor"] // 60))[0] == 3


def test_a_live_connection_is_seen_from_its_connect_time_at_the_first_poll(broker: Broker) -> None:
    """Its AUTH notes nothing (a handshake's cost): the poll that first reads the
    connection with its ident marks the ident seen at its connect time, once."""

    class Live:
        id = 7
        connected_at = T0 - 30.0
        ident = "cowrie-eu-01"
        publish_stats: dict[bytes, PublishStats] = {}

        @property
        def session(self) -> Live:
            return self

    t = primed(broker)
    t.observe(Authenticated("10.0.0.1:7", 7, "cowrie-eu-01"))
    assert "cowrie-eu-01" not in t.last_seen
    broker.connections.add(Live())  # type: ignore[arg-type]
    broker.loop.run_until_complete(t.poll(T0 + 2))
    assert t.last_seen["cowrie-eu-01"] == T0 - 30.0
    t.last_seen["cowrie-eu-01"] = T0 - 60.0  # (a later poll does not mark it again)
    broker.loop.run_until_complete(t.poll(T0 + 4))
    assert t.last_seen["cowrie-eu-01"] == T0 - 60.0
