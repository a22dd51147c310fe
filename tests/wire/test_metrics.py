"""Publish counters are kept off the hot path but must still be exact."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, generate_latest

from hpfeeds3.broker.metrics import LabelCounter, PlainCounter
from hpfeeds3.protocol import encode_publish
from tests.support.broker import RawClient, confirm_subscribed, free_port
from tests.support.metrics import metric, wait_metric
from tests.support.metrics import scrape_flat as scrape


def test_publish_count_size_histogram_and_deliveries_are_exact(start_broker) -> None:
    exporter = free_port()
    b = start_broker("--exporter", f"127.0.0.1:{exporter}")
    sizes = [10] * 49 + [1024] + [1025] + [1500] * 19 + [5000] * 5 + [0] * 25
    with RawClient(b.port) as sub, RawClient(b.port) as pub:
        sub.auth("bob", "bob-secret")
        sub.subscribe("chan1")
        pub.auth("alice", "alice-secret")
        confirm_subscribed(sub, "chan1", sub)  # bob's own probes: alice's figures stay exact
        before = scrape(exporter)
        # one write: runs of one channel, split by a SUBSCRIBE in the middle
        frames = [encode_publish(b"alice", b"chan1", b"x" * n) for n in sizes]
        pub.send(b"".join(frames[:60]))
        pub.subscribe("chan2")
        pub.send(b"".join(frames[60:]))
        assert len(sub.messages(len(sizes))) == len(sizes)
        m = scrape(exporter)
    labels = '{chan="chan1",ident="alice"}'
    assert m[f"hpfeeds_broker_receive_publish_count_total{labels}"] == 100
    assert m[f"hpfeeds_broker_receive_publish_size_sum{labels}"] == sum(sizes)
    assert m[f"hpfeeds_broker_receive_publish_size_count{labels}"] == 100
    assert m['hpfeeds_broker_receive_publish_size_bucket{chan="chan1",ident="alice",le="1024.0"}'] == 75
    assert m['hpfeeds_broker_receive_publish_size_bucket{chan="chan1",ident="alice",le="2048.0"}'] == 95
    assert m['hpfeeds_broker_receive_publish_size_bucket{chan="chan1",ident="alice",le="8192.0"}'] == 100
    deliveries = 'hpfeeds_broker_deliveries_total{chan="chan1"}'
    assert m[deliveries] - before[deliveries] == 100
    assert m['hpfeeds_broker_subscriptions{chan="chan1",ident="bob"}'] == 1


def test_ready_and_lost_count_per_ident_and_scrape_as_counters(start_broker) -> None:
    """Counted as plain ints per ident, they still scrape as prometheus_client counters do:
    ``_total`` and ``_created`` per ident, the unauthenticated under ident ""."""
    exporter = free_port()
    b = start_broker("--exporter", f"127.0.0.1:{exporter}")
    ready, lost = "hpfeeds_broker_connection_ready_total", "hpfeeds_broker_connection_lost_total"
    for _ in range(2):
        with RawClient(b.port) as c:
            c.auth("alice", "alice-secret")
            c.subscribe("chan1")
            confirm_subscribed(c, "chan1", c)  # authenticated, and answered
    with RawClient(b.port) as bob:
        bob.auth("bob", "bob-secret")
        bob.subscribe("chan1")
        confirm_subscribed(bob, "chan1", bob)
        with RawClient(b.port) as silent:
            silent.read_info()
        m = wait_metric(exporter, lambda s: metric(s, lost, ident="alice") == 2 and metric(s, lost, ident="") >= 1)
        assert metric(m, ready, ident="alice") == 2
        assert metric(m, ready, ident="bob") == 1
        assert metric(m, lost, ident="alice") == 2
        assert metric(m, lost, ident="bob") == 0  # still connected
        assert metric(m, lost, ident="") >= 1  # the silent one (and the broker's own probes)
        assert metric(m, "hpfeeds_broker_connection_ready_created", ident="alice") > 1e9
        assert ("hpfeeds_broker_connection_ready_total", '{ident=""}') not in m


def test_plain_and_label_counters_scrape_as_prometheus_client_counters() -> None:
    """The counts kept as plain ints read as the counters they replace, creation times aside."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    made, made_ref = PlainCounter("x_made", "Made", ours), Counter("x_made", "Made", registry=theirs)
    closed = LabelCounter("x_closed", "Closed", "reason", ours)
    closed_ref = Counter("x_closed", "Closed", ["reason"], registry=theirs)
    for reason in ("a", "b", "a"):
        made.inc()
        made_ref.inc()
        closed.inc(reason)
        closed_ref.labels(reason).inc()

    def text(registry: CollectorRegistry) -> str:
        return re.sub(r"(_created\S*) \S+", r"\1 T", generate_latest(registry).decode())

    assert "x_made_total 3.0" in text(ours) and 'x_closed_total{reason="a"} 2.0' in text(ours)
    assert text(ours) == text(theirs)
