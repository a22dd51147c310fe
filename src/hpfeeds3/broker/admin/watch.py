"""Watching a channel's latest messages from the console (admins only).

A ``ChannelWatch`` is an in-process subscriber: the router hands it the same
bytes it hands a client (one or more whole PUBLISH frames), it keeps the last
``WATCH_RING`` messages with payloads cut to ``WATCH_PAYLOAD_BYTES``. A watch
nobody has read for ``WATCH_IDLE_S`` unsubscribes itself, so a closed browser
tab does not cost anything for long; at most ``MAX_WATCHES`` run at once.
In a cluster the watch subscribes like any client, so it sees messages
published on every node.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ...protocol import Decoder, FrameLimits, ProtocolError, Publish
from ..router import Router

# Messages kept per watched channel.
WATCH_RING = 50
# Payload bytes kept per message.
WATCH_PAYLOAD_BYTES = 1024
# A watch not read for this long stops.
WATCH_IDLE_S = 60.0
# Channels watched at once.
MAX_WATCHES = 8


class ChannelWatch:
    def __init__(self, router: Router, channel: bytes, limits: FrameLimits) -> None:
        self.router = router
        self.limits = limits
        self.channel = channel
        self.messages: deque[tuple[int, float, bytes, bytes, int]] = deque(maxlen=WATCH_RING)
        self.seq = 0
        self.read_at = time.monotonic()
        self._decoder = Decoder.for_broker(self.limits)

    def deliver(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError:  # cannot happen for router output; never break the fan-out
            self._decoder = Decoder.for_broker(self.limits)
            return
        now = time.time()
        for frame in frames:
            if isinstance(frame, Publish):
                self.seq += 1
                payload = frame.payload
                self.messages.append((self.seq, now, frame.ident, payload[:WATCH_PAYLOAD_BYTES], len(payload)))

    def delivery_failed(self) -> None:
        """``deliver`` raised (a bug): stop watching rather than fail again."""
        self.stop()

    def start(self) -> None:
        self.router.subscribe(self.channel, self)

    def stop(self) -> None:
        self.router.unsubscribe(self.channel, self)

    def read(self, after: int = 0) -> list[dict[str, Any]]:
        self.read_at = time.monotonic()
        return [
            {
                "seq": seq,
                "time": when,
                "ident": ident.decode("utf-8", "backslashreplace"),
                "size": size,
                "truncated": size > len(payload),
                "text": payload.decode("utf-8", "backslashreplace"),
                "hex": payload.hex(),
            }
            for seq, when, ident, payload, size in self.messages
            if seq > after
        ]


class Watches:
    def __init__(self, router: Router, limits: FrameLimits) -> None:
        self.router = router
        self.limits = limits
        self.by_channel: dict[bytes, ChannelWatch] = {}

    def get(self, channel: bytes) -> ChannelWatch | None:
        return self.by_channel.get(channel)

    def start(self, channel: bytes) -> ChannelWatch | None:
        """The watch of ``channel`` (started if needed); ``None`` when too many run."""
        self.expire()
        watch = self.by_channel.get(channel)
        if watch is None:
            if len(self.by_channel) >= MAX_WATCHES:
                return None
            watch = self.by_channel[channel] = ChannelWatch(self.router, channel, self.limits)
            watch.start()
        watch.read_at = time.monotonic()
        return watch

    def stop(self, channel: bytes) -> None:
        watch = self.by_channel.pop(channel, None)
        if watch is not None:
            watch.stop()

    def expire(self) -> None:
        cutoff = time.monotonic() - WATCH_IDLE_S
        for channel, watch in list(self.by_channel.items()):
            if watch.read_at < cutoff:
                self.stop(channel)

    def stop_all(self) -> None:
        for channel in list(self.by_channel):
            self.stop(channel)
