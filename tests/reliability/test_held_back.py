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
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator

from hpfeeds3.protocol import Error, Info, Publish, encode_subscribe
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


BROKER_FLAGS = ("--max-unauthenticated", str(POOL), "--auth-timeout", "120", "--min-receive-rate", "1")


@contextlib.contextmanager
def trickling(port: int, exporter_port: int) -> Iterator[None]:
    """A pool of two kept making progress: two connections each trickle an AUTH
    frame a byte every 0.3 s (``--min-receive-rate 1`` and ``--auth-timeout
    120`` let them go on for a minute)."""
    stop = threading.Event()
    tricklers = [RawClient(port, source=f"127.0.3.{i + 1}", timeout=10) for i in range(POOL)]
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
        wait_metric(exporter_port, lambda s: metric(s, UNAUTHENTICATED) == POOL)
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()
        for client in tricklers:
            client.close()


@contextlib.contextmanager
def broker_paused(pid: int) -> Iterator[None]:
    """The broker stopped (SIGSTOP) meanwhile: a client that connects and sends now
    has its bytes waiting before the broker accepts it, so the loop's first read of
    the new connection (made whatever ``connection_made`` asked) hands them over."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def served(sensor: RawClient, payload: bytes, round_trip_s: float = 0.0) -> object:
    """INFO, then (``round_trip_s`` later: the sensor's link) AUTH, SUBSCRIBE and a
    PUBLISH; returns the frame that came back (or the exception)."""
    try:
        # held back: a timeout here, before the hold was bounded
        info = sensor.info or sensor.next_frame(SENSOR_TIMEOUT_S)
        if not isinstance(info, Info):
            return info
        sensor.info = info
        time.sleep(round_trip_s)  # the sensor's round trip, not synchronisation
        sensor.auth("alice", "alice-secret")
        sensor.subscribe("chan1")
        sensor.publish("chan1", payload)
        return sensor.next_frame(SENSOR_TIMEOUT_S)
    except (OSError, ConnectionError) as e:
        return e


def test_a_held_back_sensor_is_started_before_its_client_gives_up(reliable_broker) -> None:
    """While two connections keep a pool of two making progress, a sensor that
    connects is held back, then started over the pool's bound while both still
    hold their slots, and is served."""
    b = reliable_broker(*BROKER_FLAGS)
    with trickling(b.port, b.exporter_port):
        with RawClient(b.port, source="127.0.4.1", timeout=SENSOR_TIMEOUT_S) as sensor:
            held = wait_metric(b.exporter_port, lambda s: metric(s, HELD_BACK) == 1)
            frame = served(sensor, b"held back, then served")
        samples = scrape(b.exporter_port)
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


SLOW_ROUND_TRIP_S = 3.0  # between INFO and AUTH: longer than the 2 s a member counts as progressing


def test_over_the_bound_a_newcomer_waits_instead_of_evicting_a_slow_sensor(reliable_broker) -> None:
    """The pool is over its bound (two tricklers and a sensor started after its
    hold); that sensor is slow (its AUTH comes 3 s after INFO, so it is idle
    meanwhile). A second sensor connecting then does not evict it (the pool
    stays over its bound either way, and the first would come back as a retry):
    it waits its turn, at most the hold, and both are served."""
    b = reliable_broker(*BROKER_FLAGS)
    results: dict[str, object] = {}
    with trickling(b.port, b.exporter_port):
        slow = RawClient(b.port, source="127.0.4.1", timeout=SENSOR_TIMEOUT_S)
        late = None
        try:
            info = slow.next_frame(SENSOR_TIMEOUT_S)  # after its hold, over the bound
            assert isinstance(info, Info), info
            slow.info = info
            # The slow sensor is idle from here until its AUTH, 3 s on: the second connects now.
            late = RawClient(b.port, source="127.0.5.1", timeout=SENSOR_TIMEOUT_S)
            second = threading.Thread(target=lambda: results.__setitem__("late", served(late, b"late")))
            second.start()
            results["slow"] = served(slow, b"slow", SLOW_ROUND_TRIP_S)
            second.join()
        finally:
            slow.close()
            if late is not None:
                late.close()
        samples = scrape(b.exporter_port)
    record(
        "over_the_bound_no_eviction",
        slow=repr(results.get("slow"))[:80],
        late=repr(results.get("late"))[:80],
        evicted=metric(samples, CLOSED, reason="too_many_unauthenticated"),
    )
    for name in ("slow", "late"):
        frame = results.get(name)
        assert isinstance(frame, Publish) and frame.payload == name.encode(), (name, frame)
    assert metric(samples, CLOSED, reason="too_many_unauthenticated") == 0


def test_bytes_a_held_back_client_sent_first_are_handled_when_it_starts(reliable_broker) -> None:
    """A client that speaks first (as a TLS sensor's ClientHello comes with its
    connect) while held back: the loop hands its first bytes over although reading
    is paused; they are kept, and handled once the connection starts."""
    b = reliable_broker(*BROKER_FLAGS)
    with trickling(b.port, b.exporter_port), contextlib.ExitStack() as stack:
        with broker_paused(b.pid):
            early = stack.enter_context(RawClient(b.port, source="127.0.4.1", timeout=SENSOR_TIMEOUT_S))
            early.send(encode_subscribe(b"alice", b"chan1"))  # before INFO, so before any AUTH
        held = wait_metric(b.exporter_port, lambda s: metric(s, HELD_BACK) == 1)
        info = early.next_frame(SENSOR_TIMEOUT_S)  # started: INFO
        answer = early.next_frame(10.0)  # and the SUBSCRIBE it sent first, handled
    assert metric(held, HELD_BACK) == 1  # it was held back: the path under test
    assert isinstance(info, Info), info
    assert isinstance(answer, Error) and "AUTH" in answer.message, answer


def test_a_held_back_client_that_sends_more_than_a_frame_is_closed_before_it_starts(reliable_broker) -> None:
    """What a held-back client sends is kept up to one largest frame and a margin
    (64 KiB): past it the connection is closed then, not kept until it starts."""
    b = reliable_broker(*BROKER_FLAGS, "--max-message-size", "1024")
    with trickling(b.port, b.exporter_port):
        before = metric(scrape(b.exporter_port), "hpfeeds_broker_limit_rejections_total", limit="pre_auth_buffer")
        with contextlib.ExitStack() as stack:
            with broker_paused(b.pid):
                flood = stack.enter_context(RawClient(b.port, source="127.0.4.1", timeout=SENSOR_TIMEOUT_S))
                # as much as the new connection's receive window takes, more than 1 KiB + 64 KiB
                flood.sock.setblocking(False)
                sent = flood.sock.send(b"x" * (512 * 1024))
                flood.sock.setblocking(True)
            assert sent > 1024 + 64 * 1024, sent
            wait_metric(
                b.exporter_port,
                lambda s: metric(s, "hpfeeds_broker_limit_rejections_total", limit="pre_auth_buffer") == before + 1,
            )
            first: object
            try:
                first = flood.next_frame(5.0)
            except (OSError, EOFError) as e:
                first = e
        samples = scrape(b.exporter_port)
    assert not isinstance(first, Info), first  # closed while held back, never started
    assert metric(samples, HELD_BACK) == 0
