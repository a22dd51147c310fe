"""What the console remembers about this broker: recent events and per-sensor activity.

Two feeds, neither on the message hot path:

- ``observe`` is an observer of the broker's typed events (``events.py``,
  ``Broker.observe``): the notable ones (failed AUTHs, blocks, slow consumers,
  revocations, and the console's own changes and failed logins) go into a
  ring of at most ``MAX_EVENTS``, and authentications and closes mark when an
  ident was last seen;
- ``poll()`` (every ``POLL_S``) reads each connection's per-channel publish
  counters (kept by the broker for its metrics) and adds what grew since the
  last poll to one-minute buckets (at most 60 per pair), from which come the
  messages in the last 5 minutes and the last hour: no per-message work is
  added. A ``Closed`` event carries the connection's final counters: it is
  read once more as it closes.

Memory is bounded: at most ``MAX_PAIRS`` (ident, channel) pairs and
``MAX_IDENTS`` idents are remembered; the least recently active go first.
All methods run on the broker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..events import Closed, Event, Kind

if TYPE_CHECKING:
    from ..state import Broker

# Events kept for the Events view.
MAX_EVENTS = 1_000
# (ident, channel) pairs whose activity is remembered.
MAX_PAIRS = 20_000
# Idents whose last-seen time is remembered.
MAX_IDENTS = 20_000
# How often publish counters are read.
POLL_S = 2.0
# Connections read per loop turn by the poll.
POLL_SLICE = 200
# One-minute buckets kept per pair: the last hour.
BUCKETS = 60

# Events shown in the Events view (connects and clean closes are too many).
NOTABLE = frozenset(
    {Kind.AUTH_FAILED, Kind.AUTH_BLOCKED, Kind.SLOW_CONSUMER, Kind.REVOKED, Kind.ADMIN_CHANGE, Kind.ADMIN_LOGIN_FAILED}
)


@dataclass(slots=True)
class Activity:
    """Publishes of one (ident, channel) pair, or of one ident over all its channels."""

    total: int = 0  # publishes counted since the console started
    last_publish: float = 0.0  # wall clock of the poll that saw the count rise
    minutes: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=BUCKETS))
    # (minute, last 5 min, last hour) as last computed; valid until the next add or minute
    _memo: tuple[int, int, int] = (-1, 0, 0)

    def add(self, minute: int, count: int) -> None:
        self.total += count
        if self.minutes and self.minutes[-1][0] == minute:
            self.minutes[-1] = (minute, self.minutes[-1][1] + count)
        else:
            self.minutes.append((minute, count))
        self._memo = (-1, 0, 0)

    def since(self, minute: int) -> int:
        return sum(c for m, c in self.minutes if m >= minute)

    def windows(self, minute: int) -> tuple[int, int]:
        """Messages in the last 5 minutes and the last hour (this minute included)."""
        memo = self._memo
        if memo[0] != minute:
            memo = self._memo = (minute, self.since(minute - 4), self.since(minute - 59))
        return memo[1], memo[2]

    def view(self, minute: int) -> dict[str, Any]:
        last_5m, last_1h = self.windows(minute)
        return {"last_publish": self.last_publish or None, "last_5m": last_5m, "last_1h": last_1h}


class Tracker:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.last_seen: OrderedDict[str, float] = OrderedDict()
        self.pairs: OrderedDict[tuple[str, str], Activity] = OrderedDict()
        self.idents: OrderedDict[str, Activity] = OrderedDict()  # all channels of an ident
        self.channels_of: dict[str, dict[str, None]] = {}  # ident → its channels in pairs
        self._seq = 0
        self._primed = False
        # Per connection id: its publish count per channel at the last poll.
        self._counted: dict[int, dict[bytes, int]] = {}

    # --- the event feed ------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """A broker event (an observer registered with ``Broker.observe``)."""
        # Every handshake makes three events: keep their path short.
        kind = event.kind
        if kind is Kind.CONNECTED:
            return  # the connection holds its own connect time
        now = time.time()
        if kind is Kind.AUTHENTICATED or kind is Kind.CLOSED:
            ident = event.ident
            if ident is not None:
                self.seen(ident, now)
            if type(event) is Closed:
                self.closed(event)
            return
        if kind in NOTABLE:
            self._seq += 1
            self.events.append(
                {
                    "id": self._seq,
                    "time": now,
                    "event": kind.value,
                    "level": logging.getLevelName(event.level).lower(),
                    "peer": event.peer,
                    "ident": event.ident,
                    "channel": event.channel,
                    "reason": event.reason,
                    "message": event.text(),
                }
            )

    def seen(self, ident: str, when: float) -> None:
        last_seen = self.last_seen
        if ident in last_seen:
            last_seen.move_to_end(ident)
            if when > last_seen[ident]:
                last_seen[ident] = when
            return
        last_seen[ident] = when
        if len(last_seen) > MAX_IDENTS:
            last_seen.popitem(last=False)

    # --- the counter poll -----------------------------------------------------------

    async def poll(self, now: float | None = None) -> None:
        """Count what every connection published since the last poll.

        Connections are read in slices of ``POLL_SLICE`` with a loop turn
        between, so 10,000 connections never stall message delivery for long.
        Each connection's counts are compared with its own counts at the last
        poll, so a slice boundary cannot count a message twice; a connection
        that closed is read as it closes (``closed``, on its ``Closed`` event).
        """
        conns = list(self.broker.connections)
        for start in range(0, len(conns), POLL_SLICE):
            if start:
                await asyncio.sleep(0)
            self.scan(conns[start : start + POLL_SLICE], now)
        live = {c.id for c in conns}  # forget any whose Closed event never came
        for conn_id in [i for i in self._counted if i not in live]:
            del self._counted[conn_id]
        self._primed = True

    def closed(self, event: Closed, now: float | None = None) -> None:
        """A connection closed: count what it published since the last poll, now
        (one that lived between two polls would otherwise never be read)."""
        if event.who is not None:
            self._count(event.conn_id, event.who, event.published, time.time() if now is None else now)
        self._counted.pop(event.conn_id, None)

    def scan(self, conns: list[Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for conn in conns:
            session = conn.session
            ident = session.ident
            if ident is not None:
                self._count(conn.id, ident, session.publish_stats, now)

    def _count(self, conn_id: int, ident: str, published: Mapping[bytes, Any], now: float) -> None:
        minute = int(now // 60)
        last = self._counted.get(conn_id)
        if last is None:
            last = self._counted[conn_id] = {}
        for chan, st in list(published.items()):
            count = st.count
            before = last.get(chan)
            if before == count:
                continue
            last[chan] = count
            if before is None and not self._primed:
                continue  # published before the console started: no minute
            self._add(ident, chan, count - (before or 0), minute, now)

    def _add(self, ident: str, chan: bytes, delta: int, minute: int, now: float) -> None:
        channel = chan.decode("utf-8", "backslashreplace")
        key = (ident, channel)
        act = self.pairs.get(key)
        if act is None:
            act = self.pairs[key] = Activity()
            self.channels_of.setdefault(ident, {})[channel] = None
            if len(self.pairs) > MAX_PAIRS:
                (old_ident, old_channel), _ = self.pairs.popitem(last=False)
                chans = self.channels_of.get(old_ident)
                if chans is not None:
                    chans.pop(old_channel, None)
                    if not chans:
                        del self.channels_of[old_ident]
        else:
            self.pairs.move_to_end(key)
        act.last_publish = now
        act.add(minute, delta)
        whole = self.idents.get(ident)
        if whole is None:
            whole = self.idents[ident] = Activity()
            if len(self.idents) > MAX_IDENTS:
                self.idents.popitem(last=False)
        else:
            self.idents.move_to_end(ident)
        whole.last_publish = now
        whole.add(minute, delta)
        self.seen(ident, now)

    def channels(self, ident: str, minute: int) -> dict[str, dict[str, Any]]:
        """One ident's channels: {last_publish, last_5m, last_1h} each."""
        out = {}
        for channel in self.channels_of.get(ident, ()):
            act = self.pairs.get((ident, channel))
            if act is not None:
                out[channel] = act.view(minute)
        return out
