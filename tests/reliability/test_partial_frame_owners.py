"""Past --max-partial-frames the broker closes from the ident holding the most
incomplete-frame bytes (then its busiest address group), not the single
largest holder: a key that parks many frames loses its own connections, and a
sensor's large upload in progress is not cut for it."""

from __future__ import annotations

import asyncio
import struct
import time
from types import SimpleNamespace
from typing import Any, cast

from hpfeeds3.broker.config import BrokerConfig, Limits
from hpfeeds3.broker.state import Broker as BrokerState
from hpfeeds3.protocol import Decoder, Publish, encode_publish, encode_subscribe

from .support import Canary, MiB, metric, record, speed_bound, wait_metric, wait_subscribed
from .test_attacks import CLOSED, authed, first_error, read_frame, readable, trickle

BOUND = 2 * MiB
PARKED = 9  # x 200 KiB: 1,800 KiB of the 2 MiB bound, so an upload passes it at 248 KiB
PARKED_BYTES = 200 * 1024
UPLOAD = 512 * 1024
UPLOAD_RATE = 128 * 1024  # bytes/s, far above --min-receive-rate


def test_a_key_parking_frames_loses_its_own_connections_not_a_sensors_upload(reliable_broker) -> None:
    """A subscribe-only key parks 9 x 200 KiB of PUBLISH frames declared 1 MiB
    long; a sensor then uploads a 512 KiB PUBLISH at 128 KiB/s, passing the
    2 MiB bound at 248 KiB (then the single largest holder). The sensor's
    upload completes and is delivered; the parking key's connections are the
    ones closed (slow_producer); the canary loses nothing."""
    b = reliable_broker("--max-partial-frames", str(BOUND))
    canary = Canary(b.port).start()
    subscriber = authed(b.port, "bob")
    subscriber.sendall(encode_subscribe(b"bob", b"chan1"))
    wait_subscribed(b.exporter_port, "bob", "chan1", 1)
    header = struct.pack(">IB", MiB, 3)  # a PUBLISH declaring 1 MiB, never finished
    parked = [authed(b.port, "reader") for _ in range(PARKED)]
    sensor = authed(b.port, "alice")
    try:
        for s in parked:
            s.sendall(header + b"\x06reader" + b"z" * (PARKED_BYTES - len(header) - 7))
        held = "hpfeeds_broker_connection_receive_buffer_size"
        samples = wait_metric(b.exporter_port, lambda m: metric(m, held, ident="reader") == PARKED * PARKED_BYTES)
        assert metric(samples, held, ident="reader") == PARKED * PARKED_BYTES
        payload = b"u" * (UPLOAD - 5 - 1 - len(b"alice") - 1 - len(b"chan1"))
        frame = encode_publish(b"alice", b"chan1", payload)
        assert len(frame) == UPLOAD
        t0 = time.monotonic()
        cut_after = trickle(sensor, frame, UPLOAD_RATE, 16 * 1024, until=30)
        upload_s = time.monotonic() - t0
        sensor_error = first_error(sensor, timeout=0.5) if cut_after is not None else None
        subscriber.settimeout(10)
        delivered = read_frame(subscriber, Decoder.for_client(), []) if cut_after is None else None
        closed_parked = [s for s in parked if readable(s)]
        errors = {first_error(s) for s in closed_parked}
        samples = wait_metric(b.exporter_port, lambda m: metric(m, CLOSED, reason="slow_producer") >= 1)
        stats = canary.stop()
    finally:
        for s in [*parked, sensor, subscriber]:
            s.close()
    record(
        "partial_frame_owners",
        bound_kib=BOUND // 1024,
        parked=PARKED,
        parked_kib=PARKED_BYTES // 1024,
        upload_kib=UPLOAD // 1024,
        upload_rate_kib_s=UPLOAD_RATE // 1024,
        sensor_cut_after_s=None if cut_after is None else round(cut_after, 2),
        sensor_error=sensor_error,
        upload_s=round(upload_s, 2),
        parked_closed=len(closed_parked),
        closed_slow_producer=metric(samples, CLOSED, reason="slow_producer"),
        **stats.summary(),
    )
    assert cut_after is None, f"the sensor's upload was cut after {cut_after:.1f} s: {sensor_error}"
    assert isinstance(delivered, Publish) and delivered.payload == payload
    assert len(closed_parked) >= 1
    assert errors == {f"limit: incomplete frames hold more than {BOUND} bytes: the largest are closed"}, errors
    assert stats.lost == 0 and stats.received == stats.sent and canary.errors == []


HOLDERS = 4000


class _Holder:
    """What ``Broker.hold_partial`` reads of a connection, and the close it calls."""

    def __init__(self, broker: BrokerState, ident: str, group: str) -> None:
        self.broker = broker
        self.peer = f"{group}:1"
        self.address = group
        self.group = (group.rsplit(".", 1)[0], group)  # (network, address), as Connection.group
        self.session = SimpleNamespace(ident=ident)
        self.closed = False

    def close(self, *args: Any, **kwargs: Any) -> None:
        self.closed = True
        self.broker.hold_partial(cast(Any, self), 0)


def test_a_pass_over_the_partial_frame_bound_does_not_sort_every_holder() -> None:
    """4,000 holders of 4,000 idents (one address group each) at the bound; a
    holder that grows passes it and is closed, its ident then holding the most.
    Records the time per pass (the sort of every holder took 1.58 ms at 4,000)."""
    loop = asyncio.new_event_loop()
    try:
        state = BrokerState(BrokerConfig(limits=Limits(max_partial_frames_bytes=HOLDERS * 1000)), cast(Any, None), loop)
        state.emit = lambda event: None  # type: ignore[method-assign]
        holders = [_Holder(state, f"ident{i}", f"10.0.{i // 250}.{i % 250}") for i in range(HOLDERS)]
        for h in holders:
            state.hold_partial(cast(Any, h), 1000)  # at the bound
        passes = 200
        t0 = time.perf_counter()
        for i in range(passes):
            # One holder grows: over the bound, its ident (now holding the most) is cut;
            # a new holder of the same ident takes its place at the bound again.
            h = holders[i]
            state.hold_partial(cast(Any, h), 1001)
            state.hold_partial(cast(Any, _Holder(state, h.session.ident, h.address)), 1000)
        per_pass_ms = (time.perf_counter() - t0) * 1000 / passes
    finally:
        loop.close()
    closed = [h for h in holders if h.closed]
    record("partial_frame_pass", holders=HOLDERS, passes=passes, per_pass_ms=round(per_pass_ms, 4))
    assert closed == holders[:passes]
    assert state.partial_bytes <= HOLDERS * 1000
    speed_bound("partial_frame_pass", "ms per pass over the bound at 4,000 holders", per_pass_ms, below=0.5)
