"""Connections held back while the pre-auth pool is full of connections making
progress (a reconnect storm's handshakes waiting on their clients' round
trips, or connections that trickle bytes): each is started before its client
gives up, not when a slot frees, however long that takes.

A sensor held back past its client's connect timeout (hpfeeds3's: 10 s for TCP,
TLS and INFO) turns into a retry that queues again behind the same crowd; in a
TLS storm of 10,000 sensors against the default pool, the broker meanwhile
waited on the clients of the handshakes in the pool, and hundreds of sensors
were retried (issue 24).
"""

from __future__ import annotations

import contextlib
import struct
import threading

from hpfeeds3.protocol import Info, Publish
from tests.support.broker import RawClient

from .support import metric, record, scrape, wait_metric

HELD_BACK = "hpfeeds_broker_held_back_connections"
UNAUTHENTICATED = "hpfeeds_broker_unauthenticated_connections"
CLOSED = "hpfeeds_broker_connections_closed_total"
POOL = 2
TRICKLE_EVERY_S = 0.3  # a byte this often: making progress (the window is 2 s)
AUTH_BODY_BYTES = 195  # an AUTH frame of 200 bytes: a minute to trickle at that pace
# Longer than the hold (5 s) with room for a loaded machine, shorter than the
# trickled frame (about a minute): before the hold was bounded, the sensor
# waited for a trickler to finish.
SENSOR_TIMEOUT_S = 25.0


def test_a_held_back_sensor_is_started_before_its_client_gives_up(reliable_broker) -> None:
    """Two connections keep a pool of two making progress for a minute, each
    trickling an AUTH frame a byte every 0.3 s (``--min-receive-rate 1`` and
    ``--auth-timeout 120`` let them); a sensor that connects meanwhile is held
    back, then started over the pool's bound while both still hold their slots,
    and is served."""
    b = reliable_broker(
        *("--max-unauthenticated", str(POOL), "--auth-timeout", "120", "--min-receive-rate", "1"),
    )
    stop = threading.Event()
    tricklers = [RawClient(b.port, source=f"127.0.3.{i + 1}", timeout=10) for i in range(POOL)]
    threads: list[threading.Thread] = []

    def trickle(client: RawClient) -> None:
        with contextlib.suppress(OSError):
            client.send(struct.pack(">IB", 5 + AUTH_BODY_BYTES, 2))  # AUTH's header
            for _ in range(AUTH_BODY_BYTES - 1):
                if stop.wait(TRICKLE_EVERY_S):
                    return
                client.send(b"x")

    try:
        for client in tricklers:
            client.read_info()
            threads.append(threading.Thread(target=trickle, args=(client,)))
            threads[-1].start()
        wait_metric(b.exporter_port, lambda s: metric(s, UNAUTHENTICATED) == POOL)
        with RawClient(b.port, source="127.0.4.1", timeout=SENSOR_TIMEOUT_S) as sensor:
            held = wait_metric(b.exporter_port, lambda s: metric(s, HELD_BACK) == 1)
            info = sensor.next_frame(SENSOR_TIMEOUT_S)  # before the fix: a timeout, still held back
            assert isinstance(info, Info), info
            sensor.info = info
            sensor.auth("alice", "alice-secret")
            sensor.subscribe("chan1")
            sensor.publish("chan1", b"held back, then served")
            frame = sensor.next_frame(SENSOR_TIMEOUT_S)
        samples = scrape(b.exporter_port)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for client in tricklers:
            client.close()
    record(
        "held_back_started_before_timeout",
        pool=POOL,
        held_back=metric(held, HELD_BACK),
        sensor=repr(frame)[:80],
        unauthenticated_after=metric(samples, UNAUTHENTICATED),
        evicted=metric(samples, CLOSED, reason="too_many_unauthenticated"),
    )
    assert metric(held, HELD_BACK) == 1  # the sensor was held back: the path under test
    assert isinstance(frame, Publish) and frame.payload == b"held back, then served", frame
    assert metric(samples, UNAUTHENTICATED) == POOL  # served while both still hold their slots
    assert metric(samples, CLOSED, reason="too_many_unauthenticated") == 0
