"""What the console remembers is bounded, and its time windows count the right minutes."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hpfeeds3.broker.admin import tracker as tracker_mod
from hpfeeds3.broker.admin import watch as watch_mod
from hpfeeds3.broker.admin.activity import DAY, ActivityStore, Batch, History
from hpfeeds3.broker.admin.sessions import Sessions
from hpfeeds3.broker.admin.tokens import Principal
from hpfeeds3.broker.admin.tracker import Tracker
from hpfeeds3.broker.admin.watch import Watches
from hpfeeds3.broker.durable.feed import FeedStats
from hpfeeds3.broker.events import (
    AdminChange,
    AuthBlocked,
    AuthFailed,
    AuthRefused,
    Closed,
    Connected,
    Revoked,
    SlowConsumerCut,
)
from hpfeeds3.broker.metrics import PublishStats
from hpfeeds3.broker.reasons import CloseReason
from hpfeeds3.broker.session import Refusal
from hpfeeds3.broker.state import Broker
from hpfeeds3.protocol import encode_publish


class Counters:
    """What the tracker reads of a connection: its id, ident, peer and per-channel publish counters."""

    _ids = iter(range(1, 1_000_000))

    def __init__(self, ident: str) -> None:
        self.id = next(Counters._ids)
        self.session = self  # the tracker reads the session's ident and counters
        self.ident = ident
        self.peer = f"{ident}:1"
        self.publish_stats: dict[bytes, PublishStats] = {}

    def published(self, channel: bytes, count: int) -> None:
        self.publish_stats.setdefault(channel, PublishStats()).count += count


def minute(now: float) -> int:
    return int(now // 60)


def poll(broker: Broker, t: Tracker, now: float) -> None:
    broker.loop.run_until_complete(t.poll(now))


def test_minutes_windows(broker: Broker) -> None:
    t = Tracker(broker)
    t0 = 1_000_000 * 60.0
    s = Counters("s")
    broker.connections.add(s)  # type: ignore[arg-type]
    s.published(b"c", 7)  # before the console started: no minute
    poll(broker, t, t0)
    s.published(b"c", 3)
    poll(broker, t, t0 + 1)
    s.published(b"c", 5)
    poll(broker, t, t0 + 6 * 60)
    assert t.channels("s", minute(t0 + 6 * 60))["c"] == {"last_publish": t0 + 6 * 60, "last_5m": 5, "last_1h": 8}
    assert t.channels("s", minute(t0 + 61 * 60))["c"]["last_1h"] == 5
    assert t.channels("s", minute(t0 + 70 * 60))["c"]["last_1h"] == 0
    assert t.idents["s"].windows(minute(t0 + 6 * 60)) == (5, 8)  # the ident over all its channels
    # A connection first seen after the first poll counts all its messages,
    # and one that closed is read one last time.
    new = Counters("new")
    broker.connections.add(new)  # type: ignore[arg-type]
    new.published(b"c", 4)
    poll(broker, t, t0 + 6 * 60 + 2)
    new.published(b"c", 2)
    broker.connections.discard(new)
    t.closed(Closed(new.peer, new.id, "new", CloseReason.CLIENT_CLOSED, new.publish_stats), t0 + 6 * 60 + 3)
    poll(broker, t, t0 + 6 * 60 + 4)
    assert t.channels("new", minute(t0 + 6 * 60 + 4))["c"]["last_5m"] == 6
    assert new.id not in t._counted


def test_poll_reads_many_connections_in_slices(broker: Broker) -> None:
    t = Tracker(broker)
    conns = [Counters(f"s{i}") for i in range(3 * tracker_mod.POLL_SLICE + 1)]
    broker.connections.update(conns)  # type: ignore[arg-type]
    poll(broker, t, 0.0)
    for c in conns:
        c.published(b"c", 2)
    poll(broker, t, 60.0)
    assert sum(a.windows(1)[0] for a in t.idents.values()) == 2 * len(conns)


def test_pairs_idents_and_buckets_are_bounded(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracker_mod, "MAX_PAIRS", 5)
    monkeypatch.setattr(tracker_mod, "MAX_IDENTS", 4)
    monkeypatch.setattr(tracker_mod, "MAX_HISTORY", 3)
    t = Tracker(broker)
    conns = [Counters(f"s{i}") for i in range(10)]
    broker.connections.update(conns)  # type: ignore[arg-type]
    poll(broker, t, 0.0)
    for minute in range(100):
        for c in conns:
            c.published(b"c", 1)
        poll(broker, t, minute * 60.0)
    assert len(t.pairs) == 5 and len(t.last_seen) == 4 and len(t.published) == 4
    assert len(t.idents) == 3 and set(t.channels_of) <= {key[0] for key in t.pairs}
    assert all(len(a.minutes) <= tracker_mod.BUCKETS for a in t.pairs.values())
    assert all(len(h.counts) == DAY for h in t.idents.values())
    # What was dropped is deleted from the store too.
    batch = t.batch(100 * 60.0)
    assert {f"s{i}" for i in range(10)} - set(t.idents) <= {i for _, i in batch.forget_history}
    assert {f"s{i}" for i in range(10)} - set(t.last_seen) <= set(batch.forget_idents)


def test_events_ring_is_bounded_and_keeps_the_newest(broker: Broker) -> None:
    t = Tracker(broker)
    broker.observe(t.observe)
    for i in range(tracker_mod.MAX_EVENTS + 50):
        broker.emit(Revoked(f"10.0.0.1:{i}", "x", "key removed"))
    broker.emit(Connected("10.0.0.2:1", 1))
    assert len(t.events) == tracker_mod.MAX_EVENTS
    assert t.events[-1]["message"] == f"revoking 10.0.0.1:{tracker_mod.MAX_EVENTS + 49} (x): key removed"
    assert all(e["event"] == "revoked" for e in t.events)  # a connect is not an event of the ring


def test_failed_auths_push_neither_changes_nor_blocks_out_of_view(broker: Broker) -> None:
    """1,050 wrong AUTHs (anyone can send them) after an operator's change and a block:
    both are still shown, in their own ring and table."""
    t = Tracker(broker)
    broker.observe(t.observe)
    broker.emit(AdminChange("10.0.0.9", "alice", "admin", "removed key 'x'", "x"))
    broker.emit(AuthBlocked("10.0.0.7", 300.0, "10.0.0.7"))
    for i in range(tracker_mod.MAX_EVENTS + 50):
        broker.emit(AuthFailed(f"10.0.0.7:{i}", "sensor-1", "wrong_secret"))
    assert [e["event"] for e in t.events] == ["admin_change", "auth_blocked"]
    assert len(t.failures) == tracker_mod.MAX_EVENTS and "10.0.0.7" in t.blocks
    assert t.trouble["sensor-1"].failed == tracker_mod.MAX_EVENTS + 50
    assert t.trouble["sensor-1"].failed_reason == "wrong secret"


def test_a_refused_auth_names_only_a_known_ident_and_grows_no_table(broker: Broker) -> None:
    """An AUTH refused at a blocked address names an ident it does not prove: a known one
    (a key, or seen) gets "blocked address" as its last reason; 10,000 made-up ones leave
    nothing behind."""
    t = Tracker(broker)
    broker.observe(t.observe)
    t.known = {"cowrie-nat-02"}.__contains__
    t.seen("cowrie-nat-03", 1.0)
    for i in range(10_000):
        broker.emit(AuthRefused(f"10.0.0.7:{i}", "10.0.0.7", f"guess-{i}<img src=x>", True, 300.0))
    assert not t.trouble and len(t.last_seen) == 1
    broker.emit(AuthRefused("10.0.0.7:1", "10.0.0.7", "cowrie-nat-02", True, 300.0))
    broker.emit(AuthRefused("10.0.0.8:1", "10.0.0.8", "cowrie-nat-03", False, 300.0))
    assert t.trouble["cowrie-nat-02"].failed == 1
    assert t.trouble["cowrie-nat-02"].failed_reason == "blocked address 10.0.0.7 (too many failed logins from it)"
    assert t.trouble["cowrie-nat-03"].failed_reason.startswith("blocked at 10.0.0.8 (too many failed logins with this")
    assert not t.events and not t.failures  # the Events view has the block itself


def test_a_block_names_the_ident_whose_wrong_secret_started_it(broker: Broker) -> None:
    t = Tracker(broker)
    broker.observe(t.observe)
    broker.emit(AuthFailed("10.0.0.7:1", "sensor-1", "wrong_secret"))
    broker.emit(AuthBlocked("10.0.0.7:1", 300.0, "2 failed AUTHs for 'sensor-1' from 10.0.0.7 within 60 s"))
    assert t.trouble["sensor-1"].failed == 1
    assert t.trouble["sensor-1"].failed_reason == (
        "wrong secret; now blocked: 2 failed AUTHs for 'sensor-1' from 10.0.0.7 within 60 s"
    )
    # A block that followed another peer's failure, or an unknown ident's, names nobody.
    broker.emit(AuthFailed("10.0.0.7:2", "sensor-2", "wrong_secret"))
    broker.emit(AuthFailed("10.0.0.7:3", "nobody", "unknown_ident"))
    broker.emit(AuthBlocked("10.0.0.7:3", 300.0, "3 failed AUTHs from 10.0.0.7 within 60 s"))
    assert t.trouble["sensor-2"].failed_reason == "wrong secret" and "nobody" not in t.trouble


class Subscriber:
    def __init__(self, *channels: bytes) -> None:
        self.session = self
        self.subscriptions = set(channels)
        self.feed: Any = None

    def deliver(self, data: bytes) -> None:
        pass

    def delivery_failed(self) -> None:
        pass


def test_delivered_messages_per_second_from_the_counts_the_broker_keeps(broker: Broker) -> None:
    """A collector's messages per second: the router's deliveries of each channel it
    subscribes over that channel's subscribers, and a durable connection's messages
    sent from the log; nothing counted per message by the console."""
    t = Tracker(broker)
    a, b = Subscriber(b"cowrie.sessions", b"dionaea.capture"), Subscriber(b"cowrie.sessions")
    for sub in (a, b):
        for channel in sub.subscriptions:
            broker.router.subscribe(channel, sub)
    broker.feed_stats["durable-col"] = stats = FeedStats()
    t.delivery_rates(100.0)
    broker.router.publish(b"cowrie.sessions", b"x" * 30, 30)
    broker.router.publish(b"dionaea.capture", b"y" * 10, 10)
    stats.replayed += 50
    t.delivery_rates(102.0)
    assert t.channel_rates == {b"cowrie.sessions": 15.0, b"dionaea.capture": 5.0}
    assert t.delivered_per_s(a) == 20.0 and t.delivered_per_s(b) == 15.0
    durable = Subscriber(b"cowrie.sessions")
    durable.feed = SimpleNamespace(ident="durable-col")  # a durable connection's feed names its ident
    assert t.feed_rates == {"durable-col": 25.0} and t.delivered_per_s(durable) == 25.0
    t.delivery_rates(104.0)  # nothing since
    assert t.delivered_per_s(a) == 0.0


def test_activity_is_written_in_batches_and_read_back(broker: Broker, tmp_path: Path) -> None:
    """The history in a real sqlite file: a second tracker (a restart) reads what the first wrote."""
    t0 = 1_000_000 * 60.0
    first = Tracker(broker, ActivityStore(str(tmp_path)))
    s = Counters("s")
    broker.connections.add(s)  # type: ignore[arg-type]
    poll(broker, first, t0)
    s.published(b"c", 3)
    poll(broker, first, t0 + 1)
    s.published(b"c", 4)
    poll(broker, first, t0 + 61)
    first.refused(Refusal.NO_PUB_PERMISSION, "s")
    first.observe(SlowConsumerCut("10.0.0.1:1", "s", "nothing drained for 10 s", 4096))
    broker.loop.run_until_complete(first.flush(t0 + 61))
    s.published(b"c", 1)
    poll(broker, first, t0 + 62)
    broker.loop.run_until_complete(first.close(t0 + 62))  # writes the last changes
    assert (tmp_path / "console" / "activity.db").exists()

    again = Tracker(broker, ActivityStore(str(tmp_path)))
    broker.loop.run_until_complete(again.load(t0 + 120))
    assert again.published["s"] == t0 + 62 and again.last_seen["s"] == t0 + 62
    assert again.idents["s"].series(minute(t0 + 120), 3) == [3, 5, 0]
    assert again.chans["c"].windows(minute(t0 + 120)) == (8, 8)
    assert again.pairs[("s", "c")].last_publish == t0 + 62
    assert again.trouble["s"].refused == 1 and again.trouble["s"].refused_reason
    assert again.trouble["s"].cut == 1 and again.trouble["s"].cut_reason == "nothing drained for 10 s"
    # A day later the minutes are gone; the last publish stays.
    later = Tracker(broker, ActivityStore(str(tmp_path)))
    broker.loop.run_until_complete(later.load(t0 + (DAY + 5) * 60))
    assert "s" not in later.idents and later.published["s"] == t0 + 62
    broker.loop.run_until_complete(again.close(t0 + 120))
    broker.loop.run_until_complete(later.close(t0 + 120))


def test_a_minute_a_day_later_starts_from_nothing_in_its_slot() -> None:
    h = History()
    m = 1_000_000
    h.add(m, 5)
    h.add(m + DAY, 2)  # the same slot of the ring, a day later
    assert h.at(m + DAY) == 2 and h.at(m) == 0
    assert h.windows(m + DAY) == (2, 2)


def test_the_history_file_keeps_a_day_of_minutes_and_forgets_before_it_remembers(tmp_path: Path) -> None:
    store = ActivityStore(str(tmp_path))
    m = 1_000_000
    store.write(Batch(minutes=[("ident", "s", m, 3), ("ident", "s", m + 10, 4)], oldest_minute=m - DAY))
    row = ("s", 5.0, 4.0, 0, None, None, 0, None, None, 0, None, None)
    # a day on: the old minutes go from the file, not only from what is loaded
    store.write(Batch(minutes=[("ident", "s", m + DAY + 5, 1)], idents=[row], oldest_minute=m + 6))
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        assert db.execute("SELECT minute, count FROM minutes ORDER BY minute").fetchall() == [
            (m + 10, 4),
            (m + DAY + 5, 1),
        ]
    # an ident dropped (a bound) and met again before the next write is kept
    store.write(Batch(forget_idents=["s"], idents=[row], oldest_minute=m + 6))
    assert [r[0] for r in store.load(m + 6).idents] == ["s"]
    store.close()


def test_a_history_file_from_before_the_cut_columns_is_read_and_written(broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "console" / "activity.db"
    path.parent.mkdir()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE idents (ident TEXT PRIMARY KEY, last_seen REAL, last_publish REAL,"
            " refused INTEGER NOT NULL DEFAULT 0, refused_reason TEXT, refused_at REAL,"
            " failed INTEGER NOT NULL DEFAULT 0, failed_reason TEXT, failed_at REAL)"
        )
        db.execute("INSERT INTO idents VALUES ('s', 5.0, 4.0, 0, NULL, NULL, 2, 'wrong secret', 3.0)")
    t = Tracker(broker, ActivityStore(str(tmp_path)))
    broker.loop.run_until_complete(t.load(10.0))
    assert t.last_seen["s"] == 5.0 and t.trouble["s"].failed == 2 and t.trouble["s"].cut == 0
    t.observe(SlowConsumerCut("10.0.0.1:1", "s", "nothing drained for 10 s", 4096))
    broker.loop.run_until_complete(t.close(10.0))
    again = Tracker(broker, ActivityStore(str(tmp_path)))
    broker.loop.run_until_complete(again.load(10.0))
    assert again.trouble["s"].failed == 2 and again.trouble["s"].cut == 1
    broker.loop.run_until_complete(again.close(10.0))


def test_sessions_are_bounded_per_token_and_expire() -> None:
    s = Sessions(ttl_s=3600, max_per_token=3)
    admin = s.create(Principal("alice", "admin"))
    made = [s.create(Principal("grafana", "viewer")) for i in range(5)]
    assert len(s) == 4 and s.count("grafana") == 3
    assert made[0] is not None and made[4] is not None and admin is not None
    assert s.get(made[0].id) is None and s.get(made[4].id) is made[4]
    assert s.get(admin.id) is admin  # another token's logins never end this one's session
    expired = Sessions(ttl_s=0.0)
    gone = expired.create(Principal("p", "admin"))
    assert gone is not None and expired.get(gone.id) is None


def test_successful_logins_are_limited_per_token() -> None:
    s = Sessions(logins_per_token=3, login_window_s=3600)
    assert all(s.create(Principal("grafana", "viewer")) for _ in range(3))
    assert s.create(Principal("grafana", "viewer")) is None
    assert s.create(Principal("alice", "admin")) is not None


def test_watches_are_bounded_and_keep_the_last_messages(broker: Broker) -> None:
    w = Watches(broker.router, broker.frame_limits)
    started = [w.start(f"c{i}".encode()) for i in range(watch_mod.MAX_WATCHES + 1)]
    assert all(started[:-1]) and started[-1] is None
    watch = started[0]
    assert watch is not None
    frames = b"".join(encode_publish(b"s", b"c0", bytes([i]) * 5000) for i in range(watch_mod.WATCH_RING + 10))
    broker.router.publish(b"c0", frames, watch_mod.WATCH_RING + 10)
    msgs = watch.read()
    assert len(msgs) == watch_mod.WATCH_RING
    assert msgs[-1]["seq"] == watch_mod.WATCH_RING + 10 and msgs[-1]["size"] == 5000 and msgs[-1]["truncated"]
    assert len(bytes.fromhex(msgs[-1]["hex"])) == watch_mod.WATCH_PAYLOAD_BYTES
    w.stop_all()
    assert broker.router.subscribers(b"c0") == ()
