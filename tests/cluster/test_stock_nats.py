"""A cluster over a NATS with its defaults: the largest frames cross, a NATS
that stops reading costs bounded memory, a NATS that is not there is said so."""

from __future__ import annotations

import pytest

from hpfeeds3.protocol import MiB
from tests.cluster.nodes import Collector, healthz, metric, start_node, wait_linked, write_keys
from tests.support.broker import RawClient, confirm_subscribed
from tests.support.nats import NatsServer

# The largest payload key n0 may publish on "plain": body = str8(ident) + str8(channel) + payload = 1 MiB.
LARGEST = MiB - (1 + len("n0")) - (1 + len("plain"))


@pytest.mark.parametrize("max_payload", [None, "64KB"], ids=["stock", "64KB"])
def test_largest_frames_cross_nodes_whole_and_in_order(tmp_path, max_payload) -> None:
    nats = NatsServer(tmp_path, max_payload=max_payload).start()
    keys = write_keys(tmp_path)
    a, b = start_node(tmp_path, nats.url, keys), start_node(tmp_path, nats.url, keys)
    try:
        for node in (a, b):
            node.wait_ready()
            wait_linked(node)
        sub = RawClient(b.port, timeout=60).auth("n1", "n1-secret")
        sub.subscribe("plain")
        payloads = []
        for i in range(6):
            if i % 2:
                payloads.append(bytes([i]) * LARGEST)
            else:
                payloads.append(str(i).encode())
        with RawClient(a.port, timeout=60) as pub:
            pub.auth("n0", "n0-secret")
            confirm_subscribed(pub, "plain", sub)  # b's NATS subscription is in place
            for p in payloads:
                pub.publish("plain", p)
            got = [m.payload for m in sub.messages(len(payloads), timeout=30)]
        assert [len(p) for p in got] == [len(p) for p in payloads]
        assert got == payloads
        assert metric(b, "hpfeeds_broker_cluster_lost_messages_total") == 0
        sub.close()
    finally:
        a.stop()
        b.stop()
        nats.stop()


def test_a_nats_that_stops_reading_fills_the_outbox_to_its_bound_only(tmp_path, nats) -> None:
    keys = write_keys(tmp_path)
    a = start_node(tmp_path, nats.url, keys, "--cluster-outbox", "1M")
    try:
        a.wait_ready()
        wait_linked(a)
        sub = Collector(a.port, "n1", ["plain"])
        nats.pause()
        n = 40_000  # 40 MiB: more than the outbox, the NATS client's buffer and the sockets hold
        with RawClient(a.port, timeout=60) as pub:
            pub.auth("n0", "n0-secret")
            for i in range(n):
                pub.publish("plain", str(i).encode().ljust(1024))
            sub.wait_count(n, timeout=60)
        assert sub.got[("n0", "plain")] == list(range(n)), "local delivery must not wait for NATS"
        a.wait_log("NATS is not taking messages as fast as they come", timeout=10)
        queued = metric(a, "hpfeeds_broker_cluster_outbox_bytes")
        dropped = metric(a, 'hpfeeds_broker_cluster_unforwarded_messages_total{reason="outbox_full"}')
        print(f"NATS paused: {n} x 1 KiB published, outbox {queued:.0f} bytes, {dropped:.0f} not forwarded")
        assert 0 < queued <= MiB
        assert dropped > 0
        assert healthz(a)["status"] == "serving"  # the link is up, only slow
        sub.close()
    finally:
        nats.resume()
        a.stop()


def test_credentials_in_the_nats_url_never_reach_the_log(tmp_path) -> None:
    password = "Sup3r-s3cret-pw"
    nats = NatsServer(tmp_path)  # not started: the unreachable line names the URL too
    url = nats.url.replace("nats://", f"nats://n0:{password}@")
    keys = write_keys(tmp_path)
    a = start_node(tmp_path, url, keys)
    try:
        a.wait_ready()
        a.wait_log("unreachable", timeout=10)
        nats.start()
        wait_linked(a)
        log = a.log()
        assert "***@127.0.0.1" in log
        assert password not in log
    finally:
        a.stop()
        nats.stop()
