"""The NATS backplane: several brokers behave as one.

Contract:
- Local delivery stays direct; every local publish run is also published to
  the channel's subject (``subjects.py``) with the PUBLISH frames unchanged as
  the NATS payload. Headers carry the origin node id, the sequence number of
  the run's first frame on that channel, and the frame count.
- A node subscribes to a channel's subject only while some local client
  subscribes to that channel. ``no_echo``: a node never receives its own
  publishes, so nothing is delivered twice.
- Order: one NATS connection per node, publishes sent in order by one pump
  task, so per-publisher order holds across nodes.
- Faults: NATS down at start → local clients are served at once and the link
  joins when NATS appears; NATS lost → local delivery goes on, nothing is
  queued for the gap (``unforwarded`` counts what this node could not send);
  receivers see the gap in the per-(origin, channel) sequence and count the
  messages they missed (``lost``) with a log line. Reconnects forever.
- A server whose ``max_payload`` is below our largest PUBLISH frame leaves the
  link down (degraded) with a clear log line: we never split or drop a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ...protocol import HEADER
from .. import metrics
from .subjects import channel_to_subject

log = logging.getLogger("hpfeeds3.broker.cluster")

H_ORIGIN = "Hpfeeds-Origin"
H_SEQ = "Hpfeeds-Seq"
H_COUNT = "Hpfeeds-Count"

# Retry cadence while NATS is unreachable (first connect and reconnects).
RECONNECT_WAIT_S = 1.0
# Largest NATS message we build by joining consecutive runs of one channel.
_JOIN_LIMIT_BYTES = 256 * 1024


class NatsBackplane:
    def __init__(
        self,
        servers: Sequence[str],
        deliver: Callable[[bytes, bytes, int], None],
        *,
        max_frame_bytes: int,
        name: str = "hpfeeds",
    ) -> None:
        self.servers = list(servers)
        self.deliver = deliver
        self.max_frame_bytes = max_frame_bytes
        self.name = name
        self.origin = os.urandom(8).hex()
        self.connected = False
        self.status = "connecting"
        self._nc: Any = None
        # (channel, frames, sequence number of the first frame, frame count)
        self._outbox: deque[tuple[bytes, bytes, int, int]] = deque()
        self._outbox_ready = asyncio.Event()
        self._wanted: set[bytes] = set()
        self._subs: dict[bytes, Any] = {}
        self._reconcile = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._seq_out: dict[bytes, int] = {}
        # (origin, channel) -> next expected sequence number
        self._seq_in: dict[tuple[str, bytes], int] = {}
        self._stopping = False
        self.unforwarded = 0
        self.lost = 0

    # --- Router hooks (sync, on the hot path: O(1), never await) -------------

    def forward(self, channel: bytes, data: bytes, count: int) -> None:
        seq = self._seq_out.get(channel, 0)
        self._seq_out[channel] = seq + count
        if not self.connected:
            self.unforwarded += count
            metrics.CLUSTER_UNFORWARDED.inc(count)
            return
        self._outbox.append((channel, data, seq, count))
        if not self._outbox_ready.is_set():
            self._outbox_ready.set()

    def want(self, channel: bytes) -> None:
        self._wanted.add(channel)
        self._reconcile.set()

    def unwant(self, channel: bytes) -> None:
        self._wanted.discard(channel)
        # A later subscription starts a fresh baseline for gap counting.
        for key in [k for k in self._seq_in if k[1] == channel]:
            del self._seq_in[key]
        self._reconcile.set()

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start linking in the background (never blocks on NATS)."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._link()),
            loop.create_task(self._pump()),
            loop.create_task(self._reconciler()),
        ]

    async def close(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2)
        self.connected = False

    # --- the link -------------------------------------------------------------------

    async def _link(self) -> None:
        import nats

        while not self._stopping:
            try:
                nc = await nats.connect(
                    servers=self.servers,
                    name=f"hpfeeds3:{self.name}:{self.origin}",
                    no_echo=True,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=RECONNECT_WAIT_S,
                    connect_timeout=2,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    closed_cb=self._on_closed,
                )
            except Exception as e:
                if self.status != "unreachable":
                    log.warning("cluster: NATS %s unreachable (%s); serving local clients, retrying", self.servers, e)
                    self.status = "unreachable"
                await asyncio.sleep(RECONNECT_WAIT_S)
                continue
            if nc.max_payload < self.max_frame_bytes:
                log.error(
                    "cluster: NATS max_payload is %d bytes, below our largest PUBLISH frame (%d bytes): "
                    "the cluster link stays down. Raise max_payload on the NATS server (e.g. 'max_payload: 2MB') "
                    "or lower --max-message-size.",
                    nc.max_payload,
                    self.max_frame_bytes,
                )
                self.status = "max_payload_too_small"
                with contextlib.suppress(Exception):
                    await nc.close()
                await asyncio.sleep(30)
                continue
            self._nc = nc
            self._mark_connected()
            self._reconcile.set()
            return

    def _mark_connected(self) -> None:
        self.connected = True
        self.status = "connected"
        metrics.CLUSTER_LINK_UP.set(1)
        url = self._nc.connected_url.netloc if self._nc and self._nc.connected_url else self.servers
        log.info("cluster: linked to NATS %s as origin %s", url, self.origin)

    async def _on_disconnected(self) -> None:
        if self.connected:
            log.warning("cluster: NATS link lost; local delivery continues, cross-node messages are not forwarded")
        self.connected = False
        self.status = "disconnected"
        metrics.CLUSTER_LINK_UP.set(0)

    async def _on_reconnected(self) -> None:
        self._mark_connected()
        self._reconcile.set()

    async def _on_error(self, e: Exception) -> None:
        log.debug("cluster: NATS error: %s", e)

    async def _on_closed(self) -> None:
        self.connected = False
        metrics.CLUSTER_LINK_UP.set(0)

    # --- subscriptions: follow the set of locally wanted channels --------------------

    async def _reconciler(self) -> None:
        while not self._stopping:
            await self._reconcile.wait()
            self._reconcile.clear()
            nc = self._nc
            if nc is None or nc.is_closed:
                continue
            for channel in list(self._subs.keys() - self._wanted):
                sub = self._subs.pop(channel)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            for channel in list(self._wanted - self._subs.keys()):
                try:
                    self._subs[channel] = await nc.subscribe(
                        channel_to_subject(channel),
                        cb=self._receiver(channel),
                        pending_bytes_limit=256 * 1024 * 1024,
                    )
                except Exception as e:
                    log.warning("cluster: cannot subscribe to %r: %s", channel, e)
                    self._reconcile.set()
                    await asyncio.sleep(RECONNECT_WAIT_S)

    def _receiver(self, channel: bytes) -> Any:
        deliver = self.deliver
        seq_in = self._seq_in

        async def on_message(msg: Any) -> None:
            data = msg.data
            headers = msg.headers or {}
            try:
                origin = headers[H_ORIGIN]
                seq = int(headers[H_SEQ])
                count = int(headers[H_COUNT])
            except (KeyError, ValueError):
                count = _count_frames(data)
                if count:
                    deliver(channel, data, count)
                return
            key = (origin, channel)
            expected = seq_in.get(key)
            if expected is not None and seq > expected:
                missed = seq - expected
                self.lost += missed
                metrics.CLUSTER_LOST.inc(missed)
                log.warning(
                    "cluster: %d message(s) on %r from node %s were lost in transit",
                    missed,
                    channel.decode("utf-8", "backslashreplace"),
                    origin,
                )
            seq_in[key] = seq + count
            deliver(channel, data, count)

        return on_message

    # --- the outgoing pump: one task, in order ------------------------------------

    async def _pump(self) -> None:
        outbox = self._outbox
        while not self._stopping:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while outbox:
                channel, data, seq, count = outbox.popleft()
                # Join the following runs of the same channel into one NATS message.
                parts = [data]
                size = len(data)
                while outbox and outbox[0][0] == channel and size + len(outbox[0][1]) <= _JOIN_LIMIT_BYTES:
                    _, more, _, more_count = outbox.popleft()
                    parts.append(more)
                    size += len(more)
                    count += more_count
                nc = self._nc
                if nc is None or not self.connected:
                    self.unforwarded += count
                    metrics.CLUSTER_UNFORWARDED.inc(count)
                    continue
                try:
                    await nc.publish(
                        channel_to_subject(channel),
                        parts[0] if len(parts) == 1 else b"".join(parts),
                        headers={H_ORIGIN: self.origin, H_SEQ: str(seq), H_COUNT: str(count)},
                    )
                except Exception as e:
                    self.unforwarded += count
                    metrics.CLUSTER_UNFORWARDED.inc(count)
                    log.debug("cluster: publish failed: %s", e)


def _count_frames(data: bytes) -> int:
    """Frames in ``data``, 0 if it is not a sequence of whole frames."""
    pos = n = 0
    end = len(data)
    while pos + 5 <= end:
        length, _ = HEADER.unpack_from(data, pos)
        if length < 5:
            return 0
        pos += length
        n += 1
    return n if pos == end else 0
