"""Router: channel → subscribers, and fan-out.

Never awaits; never copies a payload; knows nothing of sockets or NATS beyond
"deliver these bytes". A delivered PUBLISH has exactly the bytes of the one
received, so one ``bytes`` object (often several frames of one read) is handed
to every subscriber of the channel.

A channel's subscribers are a dict (insertion-ordered, O(1) to add or
remove, whatever their number); publishing iterates a tuple of them, built on
the first publish after a change and kept until the next change. So toggling a
subscription on a crowded channel costs O(1), the tuple is rebuilt at most once
per publish, and a subscriber cut during a fan-out cannot disturb the iteration.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

from .backplane import NULL_BACKPLANE, Backplane
from .durable.base import DurableLog


class Subscriber(Protocol):
    def deliver(self, data: bytes) -> None:
        """Queue ``data`` (one or more whole PUBLISH frames) for the client."""

    def delivery_failed(self) -> None:
        """``deliver`` raised: the subscriber closes itself (``internal_error``)."""


class Router:
    __slots__ = ("_backplane", "_fanout", "_subs", "_written_seen", "deliveries", "durable", "on_written")

    def __init__(self, backplane: Backplane = NULL_BACKPLANE) -> None:
        self._subs: dict[bytes, dict[Subscriber, None]] = {}
        # channel -> tuple(self._subs[channel]); absent until the next publish after a change
        self._fanout: dict[bytes, tuple[Subscriber, ...]] = {}
        # messages delivered per channel (messages x subscribers), for metrics
        self.deliveries: defaultdict[bytes, int] = defaultdict(int)
        # Other brokers (a null one in a single process): local publishes are
        # forwarded to it; it learns when this node starts/stops needing a channel.
        self._backplane = backplane
        # The durable log (state.Broker.attach_durable): a channel some durable key
        # follows is appended here, local or from another broker, before durable
        # subscribers (fed from the log, not from here) can see it.
        self.durable: DurableLog | None = None
        # Called when the log's writer has written more since the router last looked
        # (``written_batches``): durable connections that have caught up are fed at once,
        # in the loop turn that brings the publishes, not a turn later.
        self.on_written: Callable[[], None] = _nothing
        self._written_seen = 0

    def attach(self, backplane: Backplane) -> None:
        """Use ``backplane`` from now on (once, at start), telling it the channels already wanted."""
        self._backplane = backplane
        for channel in self._subs:
            backplane.want(channel)

    def subscribe(self, channel: bytes, sub: Subscriber) -> bool:
        """Add ``sub``; idempotent. Returns whether it was added."""
        members = self._subs.get(channel)
        if members is None:
            self._subs[channel] = {sub: None}
            self._backplane.want(channel)
            return True
        if sub in members:
            return False
        members[sub] = None
        self._fanout.pop(channel, None)
        return True

    def unsubscribe(self, channel: bytes, sub: Subscriber) -> bool:
        """Remove ``sub``; idempotent. Returns whether it was subscribed."""
        members = self._subs.get(channel)
        if members is None or sub not in members:
            return False
        del members[sub]
        self._fanout.pop(channel, None)
        if not members:
            del self._subs[channel]
            self._backplane.unwant(channel)
        return True

    def publish(self, channel: bytes, data: bytes, count: int) -> int:
        """Fan ``data`` (``count`` PUBLISH frames for ``channel``) out locally and remotely.

        Returns the local deliveries made (the work it cost)."""
        delivered = self.deliver_local(channel, data, count)
        self._backplane.forward(channel, data, count)
        return delivered

    def deliver_local(self, channel: bytes, data: bytes, count: int) -> int:
        """Fan out to this broker's subscribers only (frames from another broker end here).

        Each delivery is isolated: a subscriber whose ``deliver`` raises is
        told so (it closes itself) and the others still get the frames."""
        durable = self.durable
        if durable is not None and durable.wants(channel):
            durable.append(channel, data, count)
            if durable.written_batches != self._written_seen:
                self._written_seen = durable.written_batches
                self.on_written()
        subs = self._fanout.get(channel)
        if subs is None:
            subs = self._build(channel)
        if not subs:
            return 0
        for sub in subs:
            try:
                sub.deliver(data)
            except Exception:
                sub.delivery_failed()  # called inside the except: it can log the traceback
        self.deliveries[channel] += count * len(subs)
        return len(subs)

    def subscribers(self, channel: bytes) -> tuple[Subscriber, ...]:
        subs = self._fanout.get(channel)
        return self._build(channel) if subs is None else subs

    def _build(self, channel: bytes) -> tuple[Subscriber, ...]:
        members = self._subs.get(channel)
        if not members:
            return ()
        subs = self._fanout[channel] = tuple(members)
        return subs

    def channels(self) -> list[bytes]:
        return list(self._subs)


def _nothing() -> None:
    pass
