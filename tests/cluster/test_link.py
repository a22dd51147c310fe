"""The cluster link seen by an operator: ``hpfeeds_broker_cluster_link_up`` and
``hpfeeds_broker_cluster_unforwarded_messages_total`` follow a NATS outage, and
``--cluster`` with several URLs fails over between them."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import USERS
from tests.support.broker import BrokerProcess, RawClient, confirm_subscribed, start_on_free_ports, write_users_json
from tests.support.metrics import scrape_flat
from tests.support.nats import NatsServer


def node(tmp_path: Path, cluster: str) -> tuple[BrokerProcess, int]:
    write_users_json(tmp_path / "users.json", USERS)
    b = start_on_free_ports(tmp_path, "--auth", "users.json", "--cluster", cluster, exporter=True)
    return b.wait_ready(), b.exporter_port


def sample(exporter: int, name: str, absent: float | None = None) -> float:
    """A sample of ``/metrics`` (``name`` with its labels); ``absent``: the value when it is not there yet."""
    value = scrape_flat(exporter).get(name, absent)
    assert value is not None, name
    return value


def wait_sample(exporter: int, name: str, value: float, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while sample(exporter, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.1)


def publish_and_receive(c: RawClient, n: int, tag: str) -> None:
    for i in range(n):
        c.publish("chan1", f"{tag} {i}".encode())
    assert [m.payload for m in c.messages(n)] == [f"{tag} {i}".encode() for i in range(n)]


UP = "hpfeeds_broker_cluster_link_up"
UNFORWARDED = 'hpfeeds_broker_cluster_unforwarded_messages_total{reason="link_down"}'


def test_link_up_and_unforwarded_messages_follow_an_outage(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path).start()
    b, exporter = node(tmp_path, nats.url)
    try:
        b.wait_log("cluster: linked to NATS", timeout=15)
        assert sample(exporter, UP) == 1
        with RawClient(b.port) as c:
            c.auth("alice", "alice-secret")
            c.subscribe("chan1")
            confirm_subscribed(c, "chan1", c)
            publish_and_receive(c, 5, "linked")
            assert sample(exporter, UNFORWARDED, absent=0) == 0
            nats.kill()
            wait_sample(exporter, UP, 0)
            publish_and_receive(c, 7, "down")  # local delivery goes on
            assert sample(exporter, UNFORWARDED, absent=0) == 7
            nats.start()
            wait_sample(exporter, UP, 1)
            publish_and_receive(c, 3, "back")
            assert sample(exporter, UNFORWARDED, absent=0) == 7
    finally:
        assert b.stop() == 0
        nats.stop()


def test_several_nats_urls_fail_over(tmp_path: Path) -> None:
    first, second = NatsServer(tmp_path), NatsServer(tmp_path).start()  # the first is down at start
    b, exporter = node(tmp_path, f"{first.url},{second.url}")
    try:
        b.wait_log(f"cluster: linked to NATS {second.url} ", timeout=15)
        first.start()
        second.kill()
        b.wait_log(f"cluster: linked to NATS {first.url} ", timeout=20)
        assert sample(exporter, UP) == 1
        with RawClient(b.port) as c:
            c.auth("alice", "alice-secret")
            c.subscribe("chan1")
            confirm_subscribed(c, "chan1", c)
    finally:
        assert b.stop() == 0
        first.stop()
        second.stop()
