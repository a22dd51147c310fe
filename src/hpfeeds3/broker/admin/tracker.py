"""What the console remembers about this broker: recent events and per-sensor activity.

Two feeds, neither on the message hot path:

- a ``logging.Handler`` on the ``hpfeeds3.broker`` logger sees every
  connection event the broker logs anyway (``event=connected``,
  ``authenticated``, ``closed``, ``auth_failed``, ``auth_blocked``,
  ``slow_consumer``, ``revoked``, and the console's own ``admin_change``); the
  notable ones go into a ring of at most ``MAX_EVENTS``, and connects and
  closes mark when an ident was last seen;
- ``poll()`` (every ``POLL_S``) reads each connection's per-channel publish
  counters (kept by the broker for its metrics) and adds what grew since the
  last poll to one-minute buckets (at most 60 per pair), from which come the
  messages in the last 5 minutes and the last hour: no per-message work is
  added. ``closed()`` reads a connection once more as it closes.

Memory is bounded: at most ``MAX_PAIRS`` (ident, channel) pairs and
``MAX_IDENTS`` idents are remembered; the least recently active go first.
All methods run on the broker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..logs import field_value

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
NOTABLE = frozenset({"auth_failed", "auth_blocked", "slow_consumer", "revoked", "admin_change", "admin_login_failed"})


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


class Tracker(logging.Handler):
    def __init__(self, broker: Broker) -> None:
        super().__init__(level=logging.INFO)
        self.broker = broker
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.last_seen: OrderedDict[str, float] = OrderedDict()
        self.pairs: OrderedDict[tuple[str, str], Activity] = OrderedDict()
        self.idents: OrderedDict[str, Activity] = OrderedDict()  # all channels of an ident
        self.channels_of: dict[str, dict[str, None]] = {}  # ident → its channels in pairs
        self._seq = 0
        self._primed = False
        # Per connection: its publish count per channel at the last poll.
        self._counted: dict[Any, dict[bytes, int]] = {}

    # --- the log feed ------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event is None:
            return
        try:
            self._record(str(event), record)
        except Exception:  # never let the console break the broker's logging
            self.handleError(record)

    def _record(self, event: str, record: logging.LogRecord) -> None:
        # Every handshake logs three records: keep their path short.
        if event == "connected":
            return  # the connection holds its own connect time
        now = record.created
        ident_s = _opt(getattr(record, "ident", None))
        if ident_s is not None and (event == "authenticated" or event == "closed"):
            self.seen(ident_s, now)
        if event == "auth_failed" and ident_s is None and record.args:
            # The failed ident is the message's first argument (already escaped).
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            ident_s = str(args[0])
        if event in NOTABLE:
            peer_s = _opt(getattr(record, "peer", None))
            self._seq += 1
            reason = getattr(record, "reason", None)
            self.events.append(
                {
                    "id": self._seq,
                    "time": now,
                    "event": event,
                    "level": record.levelname.lower(),
                    "peer": peer_s,
                    "ident": ident_s,
                    "channel": _opt(getattr(record, "channel", None)),
                    "reason": _opt(reason),
                    "message": record.getMessage(),
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
        that closed is read as it closes (``closed``, a hook of the broker's close).
        """
        conns = list(self.broker.connections)
        for start in range(0, len(conns), POLL_SLICE):
            if start:
                await asyncio.sleep(0)
            self.scan(conns[start : start + POLL_SLICE], now)
        live = self.broker.connections
        gone = [c for c in self._counted if c not in live]
        self.scan(gone, now)
        for conn in gone:
            del self._counted[conn]
        self._primed = True

    def closed(self, conn: Any) -> None:
        """``conn`` is closing: count what it published since the last poll, now
        (one that lived between two polls would otherwise never be read)."""
        self.scan([conn])
        self._counted.pop(conn, None)

    def scan(self, conns: list[Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        minute = int(now // 60)
        counted = self._counted
        for conn in conns:
            ident = conn.ident
            if ident is None:
                continue
            last = counted.get(conn)
            if last is None:
                last = counted[conn] = {}
            for chan, st in list(conn.publish_stats.items()):
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


def _opt(value: object) -> str | None:
    if value is None or type(value) is str:
        return value  # type: ignore[return-value]
    return field_value(value)
