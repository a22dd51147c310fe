"""Attacks from NATS on a cluster node's inbound state, by a NATS client that is not a broker.

NATS permissions are the documented trust boundary, but a node's memory and
its delivery of real messages must not depend on them: each test here sends
what any NATS client could, against real ``nats-server`` and broker
processes, and prints its figures with ``pytest -s``.
"""

from __future__ import annotations

import time
from pathlib import Path

from hpfeeds3.broker.backplane.subjects import channel_to_subject
from hpfeeds3.broker.backplane.wire import H_ORIGIN, INBOUND_ENTRIES, headers
from hpfeeds3.protocol import encode_publish
from tests.cluster.nodes import nats_publish, seen_on_nats, start_linked, write_keys
from tests.support.broker import RawClient
from tests.support.nats import NatsServer

from .support import MiB, PeakSampler, Probe, record

SUBJECT = channel_to_subject(b"plain")


def drain(client: RawClient, quiet_s: float = 0.5) -> None:
    """Read and drop frames until none comes for ``quiet_s``."""
    client.pending.clear()
    while True:
        try:
            client.next_frame(quiet_s)
        except TimeoutError:
            return


def test_a_forged_sequence_number_does_not_silence_a_real_node(tmp_path: Path) -> None:
    """One message with a real node's origin (read from ``hpfeeds.>``) and
    ``Hpfeeds-Seq`` 9e17 made every later message of that node on that channel
    look replayed: 0/20 delivered after it. The jump is held, not trusted."""
    server = NatsServer(tmp_path).start()
    keys = write_keys(tmp_path, ["plain"])
    a = start_linked(tmp_path, server.url, keys)
    b = start_linked(tmp_path, server.url, keys)
    try:
        with RawClient(b.port) as sub, RawClient(a.port) as pub:
            sub.auth("n1", "n1-secret")
            sub.subscribe("plain")
            pub.auth("n0", "n0-secret")
            origin = seen_on_nats(server.url, pub)[H_ORIGIN]
            # b delivers a's messages once its NATS subscription is in place.
            deadline = time.monotonic() + 10
            while True:
                pub.publish("plain", b"ready")
                try:
                    if sub.messages(1, timeout=0.5)[0].payload == b"ready":
                        break
                except TimeoutError:
                    assert time.monotonic() < deadline, "b never delivered a's messages"
            drain(sub)  # the readies still in flight
            forged = encode_publish(b"n0", b"plain", b"forged")
            nats_publish(server.url, [(SUBJECT, forged, headers(origin, 9 * 10**17, 1))])
            for i in range(20):
                pub.publish("plain", f"real {i}".encode())
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while len(got) < 20 and time.monotonic() < deadline:
                try:
                    got += [m.payload for m in sub.messages(1, timeout=1)]
                except (TimeoutError, AssertionError):
                    break
        real = [p for p in got if p.startswith(b"real ")]
        record("forged_sequence_jump", origin=origin, delivered_after=len(real), sent_after=20)
        assert real == [f"real {i}".encode() for i in range(20)]
        assert b"forged" not in got
    finally:
        a.stop()
        b.stop()
        server.stop()


def test_fake_origins_do_not_grow_a_node_without_bound(tmp_path: Path) -> None:
    """400,000 fake origins, each one part of a split frame (no delivery, one
    (origin, channel) entry each): the node grew by about 200 bytes per origin
    (80 MiB), for ever. The entries are an LRU of ``INBOUND_ENTRIES``."""
    origins = 400_000
    server = NatsServer(tmp_path).start()
    keys = write_keys(tmp_path, ["plain"])
    b = start_linked(tmp_path, server.url, keys)
    try:
        with RawClient(b.port) as sub:
            sub.auth("n1", "n1-secret")
            sub.subscribe("plain")
            end = encode_publish(b"n0", b"plain", b"end")
            # Subscribed on NATS once a message sent now arrives.
            deadline = time.monotonic() + 10
            while True:
                nats_publish(server.url, [(SUBJECT, end, headers("ffffffffffffffff", 0, 1))])
                try:
                    sub.messages(1, timeout=0.5)
                    break
                except (TimeoutError, AssertionError):
                    assert time.monotonic() < deadline, "the node never subscribed"
            probe = Probe(b.proc.pid)
            before = probe.rss()
            batch = 5_000  # below what a subscription may hold unread, so none is dropped
            with PeakSampler(probe) as peak:
                start = time.monotonic()
                for first in range(0, origins, batch):
                    flood = [(SUBJECT, b"x", headers(f"{i:016x}", 0, 1, (1, 2))) for i in range(first, first + batch)]
                    # One connection: NATS keeps its order, so "end" arrives after the batch.
                    nats_publish(server.url, [*flood, (SUBJECT, end, headers(f"e{first:015x}", 0, 1))])
                    got = sub.messages(1, timeout=60)[0]
                    assert got.payload == b"end"
                elapsed = time.monotonic() - start
            after = probe.rss()
        growth = max(peak.peak, after) - before
        record(
            "fake_origins",
            origins=origins,
            entries_bound=INBOUND_ENTRIES,
            seconds=round(elapsed, 2),
            rss_growth_mib=round(growth / MiB, 1),
            bytes_per_origin=round(growth / origins),
        )
        # Unbounded, ~200 B per origin (80 MiB); bounded, the table and one batch in flight (~14 MiB).
        assert growth < 30 * MiB, growth
    finally:
        b.stop()
        server.stop()
