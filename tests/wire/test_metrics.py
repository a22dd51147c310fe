"""Publish counters are kept off the hot path but must still be exact."""

from __future__ import annotations

from hpfeeds3.protocol import encode_publish
from tests.support.broker import RawClient, confirm_subscribed, free_port
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
