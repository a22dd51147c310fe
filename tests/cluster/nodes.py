"""Cluster nodes as the tests drive them: broker processes with an exporter, and a threaded collector."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import nats

from tests.support import metrics
from tests.support.broker import BrokerProcess, RawClient, start_on_free_ports, write_users_json
from tests.support.broker import free_port as free_port

CHANNELS = ["plain", "dots.in.name", "star*", "gt>", "with space", "ünïcödé"]


def start_node(tmp_path: Path, nats_url: str, auth: str, *extra: str) -> BrokerProcess:
    """A node with an exporter (``exporter_port``), linked to ``nats_url``; not waited for."""
    return start_on_free_ports(tmp_path, "--auth", auth, "--cluster", nats_url, *extra, exporter=True)


def start_linked(tmp_path: Path, nats_url: str, auth: str, *extra: str) -> BrokerProcess:
    """``start_node``, once serving and linked to NATS."""
    b = start_node(tmp_path, nats_url, auth, *extra)
    try:
        b.wait_ready()
        wait_linked(b)
    except BaseException:
        b.stop()
        raise
    return b


def seen_on_nats(url: str, publisher: RawClient, channel: str = "plain", timeout: float = 10.0) -> dict[str, str]:
    """The headers of a message from ``publisher``'s node, as any NATS client allowed ``hpfeeds.>`` reads them."""

    async def run() -> dict[str, str]:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        try:
            sub = await nc.subscribe("hpfeeds.>")
            await nc.flush(5)
            deadline = time.monotonic() + timeout
            while True:
                publisher.publish(channel, b"seen on NATS")
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    if time.monotonic() > deadline:
                        raise
                    continue
                assert msg.headers is not None
                return dict(msg.headers)
        finally:
            await nc.close()

    return asyncio.run(run())


def metric(b: BrokerProcess, name: str) -> float:
    """A sample of ``b``'s ``/metrics``, ``name`` with its labels as exposed (0 when absent)."""
    return metrics.scrape_flat(b.exporter_port).get(name, 0.0)


def healthz(b: BrokerProcess) -> dict:
    return metrics.healthz(b.exporter_port)


def wait_linked(b: BrokerProcess, timeout: float = 15) -> None:
    b.wait_log("cluster: linked to NATS", timeout=timeout)


class Collector:
    """A subscriber reading in a thread; ``got[(ident, channel)]`` = payloads in order,
    ``by_publisher[ident]`` = (channel, payload) in arrival order, ``probes`` = idents
    whose ``probe`` payload arrived (not counted), ``ends`` = (ident, channel) pairs
    whose ``end`` did."""

    def __init__(self, port: int, ident: str, channels: list[str]) -> None:
        self.client = RawClient(port, timeout=60)
        self.client.auth(ident, f"{ident}-secret")
        self.client.subscribe(*channels)
        self.got: dict[tuple[str, str], list[int]] = {}
        self.by_publisher: dict[str, list[tuple[str, str]]] = {}
        self.probes: set[str] = set()
        self.ends: set[tuple[str, str]] = set()
        self.count = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                frame = self.client.next_frame(timeout=0.5)
            except TimeoutError:
                continue
            except (OSError, ConnectionError):
                return
            key = (frame.ident.decode(), frame.channel.decode())  # type: ignore[union-attr]
            payload = frame.payload.decode()  # type: ignore[union-attr]
            if payload == "probe":
                self.probes.add(key[0])
                continue
            self.by_publisher.setdefault(key[0], []).append((key[1], payload))
            if payload == "end":
                self.ends.add(key)
                continue
            self.got.setdefault(key, []).append(int(payload))
            self.count += 1

    def wait_count(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.client.close()


def probe_until_seen(pubs: list[RawClient], channel: str, subs: list[Collector], timeout: float = 15) -> None:
    """Instead of sleeping: each node's NATS subscriptions are in place once every
    subscriber has a probe from every publisher (probes are sent until then)."""
    idents = {p.ident.decode() for p in pubs}
    for s in subs:
        s.probes.clear()
    deadline = time.monotonic() + timeout
    while any(not idents <= s.probes for s in subs):
        assert time.monotonic() < deadline, [s.probes for s in subs]
        for pub in pubs:
            pub.publish(channel, b"probe")
        time.sleep(0.2)


def write_keys(tmp_path: Path, channels: list[str] = CHANNELS) -> str:
    """Keys n0, n1, n2 (secret ``nI-secret``) for ``channels`` in a JSON file; returns its --auth spec."""
    users = {f"n{i}": {"secret": f"n{i}-secret", "pubchans": channels, "subchans": channels} for i in range(3)}
    write_users_json(tmp_path / "users.json", users)
    return "users.json"


def nats_publish(url: str, messages: list[tuple[str, bytes, dict[str, str] | None]], **options: object) -> None:
    """Publish raw NATS messages as any NATS client could: no broker, no hpfeeds key."""

    async def run() -> None:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, **options)  # type: ignore[arg-type]
        try:
            for subject, data, headers in messages:
                await nc.publish(subject, data, headers=headers)
            await nc.flush(5)
        finally:
            await nc.close()

    asyncio.run(run())
