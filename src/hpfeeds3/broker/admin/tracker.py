"""What the console remembers about this broker: recent events and per-sensor activity.

Two feeds, neither on the message hot path:

- ``observe`` is an observer of the broker's typed events (``events.py``,
  ``Broker.observe``): the notable ones (failed AUTHs, blocks, slow consumers,
  revocations, and the console's own changes and failed logins) go into a
  ring of at most ``MAX_EVENTS``, and closes mark when an ident was last seen
  (a live connection is marked by the poll that first reads it, at its
  connect time). Every handshake makes a close, so it is only noted (the
  ident's latest time; what the connection published, summed per ident and
  channel in the current minute) and counted by ``settle()``, once per ident
  and channel, at the next poll or view (or when ``SETTLE_AT`` are waiting):
  an open console then costs a handshake a few dict operations instead of its
  share of the tables below, and nothing of the connection is kept (no work
  for the cyclic GC);
- ``poll()`` (every ``POLL_S``) reads each connection's per-channel publish
  counters (kept by the broker for its metrics) and adds what grew since the
  last poll to one-minute buckets (at most 60 per pair), from which come the
  messages in the last 5 minutes and the last hour: no per-message work is
  added. A ``Closed`` event carries the connection's final counters: it is
  read once more as it closes. The same poll reads the router's deliveries
  per channel and the durable feeds' messages sent, for the messages per
  second delivered to each collector.

Why an ident sends (or gets) nothing is kept per ident (``Trouble``): refused
publishes, failed logins (a wrong secret; an AUTH refused at a blocked
address, for an ident the console knows) and slow-consumer cuts.

Memory is bounded: at most ``MAX_PAIRS`` (ident, channel) pairs and
``MAX_IDENTS`` idents are remembered, and per-minute history (24 hours) for
``activity.MAX_HISTORY`` idents and as many channels; the least recently
active go first. Events are kept in two rings of ``MAX_EVENTS``: failed AUTHs
(which anyone can make) apart from the rest, and blocks in a table of their
own, so a flood of wrong secrets cannot push an operator's change or a
running block out of view. What survives a restart is written to the data
directory by ``activity.ActivityStore`` in batches, off the event loop.
All other methods run on the broker's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..events import (
    AuthBlocked,
    Authenticated,
    AuthFailed,
    AuthRefused,
    Closed,
    Connected,
    Event,
    Kind,
    SlowConsumerCut,
)
from ..session import Refusal
from .activity import DAY, MAX_HISTORY, ActivityStore, Batch, History, Trouble

if TYPE_CHECKING:
    from ..state import Broker

log = logging.getLogger("hpfeeds3.broker.admin")

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
# Authentications and closes noted before they are counted without waiting for the poll.
SETTLE_AT = 4096
# One-minute buckets kept per pair: the last hour.
BUCKETS = 60

# Events shown in the Events view (connects and clean closes are too many).
NOTABLE = frozenset(
    {Kind.AUTH_FAILED, Kind.AUTH_BLOCKED, Kind.SLOW_CONSUMER, Kind.REVOKED, Kind.ADMIN_CHANGE, Kind.ADMIN_LOGIN_FAILED}
)
# Kept in a ring of their own: anyone who can connect makes them.
FAILURES = frozenset({Kind.AUTH_FAILED, Kind.ADMIN_LOGIN_FAILED})
# Blocks remembered (the latest per address).
MAX_BLOCKS = 1_000
# Refusals shown on a sensor's row: why it may send nothing.
REFUSED_REASONS = {
    Refusal.NO_PUB_PERMISSION: "publish to a channel its key does not allow",
    Refusal.IDENT_MISMATCH_PUB: "publish under another ident",
}
FAILED_REASONS = {"wrong_secret": "wrong secret", "unknown_ident": "unknown ident"}


def blocked_reason(event: AuthRefused) -> str:
    """A refused AUTH's reason on the row of the ident it names."""
    if event.whole_address:
        return f"blocked address {event.source} (too many failed logins from it)"
    return f"blocked at {event.source} (too many failed logins with this ident from there)"


K = TypeVar("K")
V = TypeVar("V")
# Publishes summed before they are added: (ident, channel, minute) -> (count, latest time).
_Counts = dict[tuple[str, bytes, int], tuple[int, float]]


def _touch(table: OrderedDict[K, V], key: K, make: Callable[[], V], bound: int) -> tuple[V, list[K]]:
    """``table[key]`` (made with ``make()`` if missing) as the most recent; the keys evicted."""
    value = table.get(key)
    if value is not None:
        table.move_to_end(key)
        return value, []
    value = table[key] = make()
    evicted = []
    while len(table) > bound:
        evicted.append(table.popitem(last=False)[0])
    return value, evicted


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
    def __init__(self, broker: Broker, store: ActivityStore | None = None) -> None:
        self.broker = broker
        self.store = store
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)  # changes, cuts, revocations, blocks
        self.failures: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)  # failed AUTHs and console logins
        self.blocks: OrderedDict[str, dict[str, Any]] = OrderedDict()  # address -> its latest block
        self.last_seen: OrderedDict[str, float] = OrderedDict()
        self.published: OrderedDict[str, float] = OrderedDict()  # ident -> its last publish
        self.pairs: OrderedDict[tuple[str, str], Activity] = OrderedDict()
        self.idents: OrderedDict[str, History] = OrderedDict()  # all channels of an ident, 24 h
        self.chans: OrderedDict[str, History] = OrderedDict()  # all idents of a channel, 24 h
        self.trouble: OrderedDict[str, Trouble] = OrderedDict()
        self.channels_of: dict[str, dict[str, None]] = {}  # ident → its channels in pairs
        self._seq = 0
        self._primed = False
        # Per connection id: its publish count per channel at the last poll.
        self._counted: dict[int, dict[bytes, int]] = {}
        # Per connection id: bytes sent to it per second between the last two polls, and
        # (when, bytes sent) at the last poll.
        self.rates: dict[int, float] = {}
        self._sent: dict[int, tuple[float, int]] = {}
        # Messages delivered per second between the last two polls to each subscriber of a
        # channel (the router's deliveries over its subscribers), and to each durable
        # ident's connection (messages sent from the log); the counts at the last poll.
        self.channel_rates: dict[bytes, float] = {}
        self.feed_rates: dict[str, float] = {}
        self._deliveries: tuple[float, dict[bytes, int], dict[str, int]] | None = None
        # Whether an ident has a key (set by the console: its key list as last read).
        self.known: Callable[[str], bool] = lambda ident: False
        # The last wrong secret: (peer, ident); a block that follows from that peer names it.
        self._last_failed: tuple[str, str] | None = None
        # Changed since the last write to the store.
        self._dirty_idents: set[str] = set()
        self._dirty_pairs: set[tuple[str, str]] = set()
        self._dirty_minutes: set[tuple[str, str, int]] = set()
        self._forget = Batch()
        self._executor: ThreadPoolExecutor | None = None
        # Noted by ``observe`` and counted by ``settle``: the idents of closed connections
        # (their latest close), and what they published since the last settle, per
        # (ident, channel): [messages, latest close]; all in minute ``_minute``, which
        # starts at ``_minute_start`` and ends at ``_minute_end`` (a close past it
        # settles first).
        self._arrived: dict[str, float] = {}
        self._pending: dict[tuple[str, bytes], list[Any]] = {}
        self._minute = -1
        self._minute_start = self._minute_end = 0.0

    # --- the history on disk -----------------------------------------------------------

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="console-activity")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def load(self, now: float | None = None) -> None:
        """Read what the store kept (on its thread); before the console serves."""
        if self.store is None:
            return
        now = time.time() if now is None else now
        loaded = await self._run(self.store.load, int(now // 60) - DAY + 1)
        for ident, seen, published, refused, r_reason, r_at, failed, f_reason, f_at, *cut in loaded.idents:
            if seen:
                self.seen(ident, seen)
            if published:
                _touch(self.published, ident, float, MAX_IDENTS)
                self.published[ident] = published
            if refused or failed or cut[0]:
                self.trouble[ident] = Trouble(refused, r_reason, r_at, failed, f_reason, f_at, *cut)
        for ident, channel, published in loaded.pairs:
            act, _ = _touch(self.pairs, (ident, channel), Activity, MAX_PAIRS)
            act.last_publish = published or 0.0
            self.channels_of.setdefault(ident, {})[channel] = None
        for kind, name, minute, count in loaded.minutes:
            table = self.idents if kind == "i" else self.chans
            hist, _ = _touch(table, name, History, MAX_HISTORY)
            hist.add(minute, count)
            if kind == "i":
                hist.last_publish = self.published.get(name, 0.0)
        self._bound_trouble()

    def batch(self, now: float) -> Batch:
        """What changed since the last call, as rows for the store."""
        self.settle()
        out, self._forget = self._forget, Batch()
        for ident in self._dirty_idents:
            t = self.trouble.get(ident) or Trouble()
            out.idents.append(
                (
                    ident,
                    self.last_seen.get(ident),
                    self.published.get(ident),
                    t.refused,
                    t.refused_reason,
                    t.refused_at,
                    t.failed,
                    t.failed_reason,
                    t.failed_at,
                    t.cut,
                    t.cut_reason,
                    t.cut_at,
                )
            )
        for key in self._dirty_pairs:
            act = self.pairs.get(key)
            if act is not None:
                out.pairs.append((key[0], key[1], act.last_publish))
        for kind, name, minute in self._dirty_minutes:
            hist = (self.idents if kind == "i" else self.chans).get(name)
            if hist is not None:
                out.minutes.append((kind, name, minute, hist.at(minute)))
        self._dirty_idents.clear()
        self._dirty_pairs.clear()
        self._dirty_minutes.clear()
        out.oldest_minute = int(now // 60) - DAY + 1
        return out

    async def flush(self, now: float | None = None) -> None:
        """Write what changed, on the store's thread (one transaction). A store that cannot
        be written is said once in the log and left: the history goes on in memory."""
        batch = self.batch(time.time() if now is None else now)  # taken even with no store: bounded
        store = self.store
        if store is None or not batch:
            return
        try:
            await self._run(store.write, batch)
        except Exception as e:
            log.error("console activity history %s: cannot write (%s); keeping it in memory only", store.path, e)
            self.store = None
            with contextlib.suppress(Exception):
                await self._run(store.close)

    async def close(self, now: float | None = None) -> None:
        """Write the last changes and close the store."""
        try:
            await self.flush(now)
        finally:
            if self.store is not None:
                await self._run(self.store.close)
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # --- the event feed ------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """A broker event (an observer registered with ``Broker.observe``)."""
        # Every handshake makes three events: their path is kept short (told apart by
        # type: a ``Kind.X`` lookup costs 0.1 µs on Python 3.11) and keeps nothing of
        # the connection (a list of closed connections kept until the next settle
        # made the cyclic GC run on handshakes that, without the console, leave it
        # nothing to do).
        cls = type(event)
        if cls is Closed:
            self.closed(event, time.time())  # type: ignore[arg-type]  # (mypy does not narrow cls)
            return
        if cls is Authenticated or cls is Connected:
            # Nothing to note: the poll marks a live connection's ident seen (at its
            # connect time) the first time it reads it, and its close notes it again.
            return
        kind = event.kind
        now = time.time()
        self.settle()  # in order with what was noted before
        if type(event) is AuthRefused:
            self.refused_auth(event, now)
            return
        if kind not in NOTABLE:
            return
        self._seq += 1
        entry = {
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
        if kind in FAILURES:
            self.failures.append(entry)
            if type(event) is AuthFailed:
                wrong_secret = event.why == "wrong_secret"
                self._last_failed = (event.peer, event.shown) if wrong_secret else None
                if wrong_secret:
                    self._trouble(event.shown, now, failed=FAILED_REASONS[event.why])
            return
        self.events.append(entry)
        if type(event) is SlowConsumerCut and event.who is not None:
            self._trouble(event.who, now, cut=event.why)
        if type(event) is AuthBlocked:
            last = self._last_failed
            if not event.console and last is not None and last[0] == event.peer:
                # The wrong secret that started this block (the limiter counts it first).
                t = self.trouble.get(last[1])
                if t is not None:
                    t.failed_reason = f"wrong secret; now blocked: {event.block}"
                    self._dirty_idents.add(last[1])
            self.blocks[event.peer] = {**entry, "block_s": event.block_s, "console": event.console}
            self.blocks.move_to_end(event.peer)
            if len(self.blocks) > MAX_BLOCKS:
                self.blocks.popitem(last=False)

    def closed(self, event: Closed, now: float) -> None:
        """A connection closed at ``now``: noted as seen, and what it published since the
        poll that last read it (all of it if none did) noted for ``settle``."""
        who = event.who
        if who is None:
            return  # never authenticated: nothing to count (the poll forgets its id)
        arrived = self._arrived
        arrived[who] = now
        if len(arrived) >= SETTLE_AT:
            self.settle()
        last = self._counted.pop(event.conn_id, None)
        published = event.published
        if published and (self._primed or last):
            if not self._minute_start <= now < self._minute_end:
                self._begin_minute(now)
            pending, primed = self._pending, self._primed
            for chan, st in published.items():
                before = last.get(chan) if last else None
                if before is None:
                    if not primed:
                        continue  # published before the console started: no minute
                    delta = st.count
                else:
                    delta = st.count - before
                if delta:
                    key = (who, chan)
                    noted = pending.get(key)
                    if noted is None:
                        pending[key] = [delta, now]
                        if len(pending) >= SETTLE_AT:
                            self.settle()
                            pending = self._pending
                    else:
                        noted[0] += delta
                        noted[1] = now

    def refused(self, refusal: Refusal, ident: str | None) -> None:
        """A refused frame or connection (``Broker.refusal_observers``): a sensor's refused publishes.
        Refusals before AUTH have no ident and are not counted here (a claimed ident proves
        nothing); a blocked address is in the Events view's Blocked table."""
        reason = REFUSED_REASONS.get(refusal)
        if reason is not None and ident is not None:
            self._trouble(ident, time.time(), refused=reason)

    def refused_auth(self, event: AuthRefused, now: float) -> None:
        """An AUTH refused because its address (or address and ident) is blocked: a failed
        login of the ident it names, with "blocked address" as the reason, when that ident
        has a key or was seen. The claim proves nothing, so an ident the console does not
        know leaves no trace (no table grows with what a client names); whoever sent it
        gets the same refusal either way."""
        ident = event.claimed
        if ident in self.trouble or ident in self.last_seen or self.known(ident):
            self._trouble(ident, now, failed=blocked_reason(event))

    def _trouble(
        self, ident: str, now: float, *, refused: str | None = None, failed: str | None = None, cut: str | None = None
    ) -> None:
        t, _ = _touch(self.trouble, ident, Trouble, MAX_IDENTS)
        if cut is not None:
            t.cut += 1
            t.cut_reason, t.cut_at = cut, now
        if refused is not None:
            t.refused += 1
            t.refused_reason, t.refused_at = refused, now
        if failed is not None:
            t.failed += 1
            t.failed_reason, t.failed_at = failed, now
        self._dirty_idents.add(ident)
        self._bound_trouble()

    def _bound_trouble(self) -> None:
        while len(self.trouble) > MAX_IDENTS:
            self.trouble.popitem(last=False)

    def seen(self, ident: str, when: float) -> None:
        last_seen = self.last_seen
        self._dirty_idents.add(ident)
        if ident in last_seen:
            last_seen.move_to_end(ident)
            if when > last_seen[ident]:
                last_seen[ident] = when
            return
        last_seen[ident] = when
        if len(last_seen) > MAX_IDENTS:
            old, _ = last_seen.popitem(last=False)
            self._forget.forget_idents.append(old)
            self.trouble.pop(old, None)
            self.published.pop(old, None)

    # --- the counter poll -----------------------------------------------------------

    async def poll(self, now: float | None = None) -> None:
        """Count what every connection published since the last poll.

        Connections are read in slices of ``POLL_SLICE`` with a loop turn
        between, so 10,000 connections never stall message delivery for long.
        Each connection's counts are compared with its own counts at the last
        poll, so a slice boundary cannot count a message twice; a connection
        that closed is read as it closes (``closed``, on its ``Closed`` event).
        """
        self.settle()
        conns = list(self.broker.connections)
        for start in range(0, len(conns), POLL_SLICE):
            if start:
                await asyncio.sleep(0)
            self.scan(conns[start : start + POLL_SLICE], now)
        self.delivery_rates()
        live = {c.id for c in conns}  # forget any whose Closed event never came
        for conn_id in [i for i in self._counted if i not in live]:
            del self._counted[conn_id]
        for conn_id in [i for i in self._sent if i not in live]:
            del self._sent[conn_id]
            self.rates.pop(conn_id, None)
        self._primed = True

    def delivery_rates(self, clock: float | None = None) -> None:
        """Messages per second delivered to each subscriber of a channel, and to each
        durable connection, since the last poll: from counts the broker keeps anyway (the
        router's deliveries per channel, the durable feeds' messages sent), so nothing is
        added per message. A channel's rate is its new deliveries over its subscribers now
        (exact while they did not change between two polls)."""
        broker = self.broker
        router = broker.router
        clock = time.monotonic() if clock is None else clock
        deliveries = dict(router.deliveries)
        fed = {ident: st.replayed for ident, st in broker.feed_stats.items()}
        before = self._deliveries
        self._deliveries = (clock, deliveries, fed)
        if before is None or clock <= before[0]:
            return
        elapsed = clock - before[0]
        rates: dict[bytes, float] = {}
        was = before[1]
        for channel, count in deliveries.items():
            grew = count - was.get(channel, 0)
            if grew:
                subscribers = len(router.subscribers(channel))
                if subscribers:
                    rates[channel] = grew / subscribers / elapsed
        self.channel_rates = rates
        was_fed = before[2]
        self.feed_rates = {ident: (n - was_fed.get(ident, 0)) / elapsed for ident, n in fed.items()}

    def delivered_per_s(self, conn: Any) -> float:
        """Messages per second handed to ``conn``'s transport between the last two polls."""
        feed = getattr(conn, "feed", None)
        if feed is not None:
            return self.feed_rates.get(feed.ident, 0.0)
        rates = self.channel_rates
        return sum(rates.get(channel, 0.0) for channel in conn.session.subscriptions)

    def settle(self) -> None:
        """Count the closes ``observe`` noted: each ident's last seen once, and what the
        closed connections published, summed per ident and channel (all in one minute),
        added to the tables."""
        arrived, pending = self._arrived, self._pending
        if not (arrived or pending):
            return
        self._arrived, self._pending = {}, {}
        for ident, when in arrived.items():
            self.seen(ident, when)
        minute = self._minute
        for (ident, chan), (delta, when) in pending.items():
            self._add(ident, chan, delta, minute, when)

    def _begin_minute(self, now: float) -> None:
        """Closes noted from now on are counted in ``now``'s minute: those of the last are counted first."""
        self.settle()
        minute = int(now // 60)
        self._minute = minute
        self._minute_start = minute * 60.0
        self._minute_end = self._minute_start + 60.0

    def scan(self, conns: list[Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        clock = time.monotonic()
        sent_before, rates = self._sent, self.rates
        counts: _Counts = {}
        for conn in conns:
            sent = getattr(conn, "sent_bytes", 0)
            before = sent_before.get(conn.id)
            if before is not None and clock > before[0]:
                rates[conn.id] = (sent - before[1]) / (clock - before[0])
            sent_before[conn.id] = (clock, sent)
            session = conn.session
            ident = session.ident
            if ident is not None:
                if conn.id not in self._counted:  # read with its ident for the first time
                    self.seen(ident, getattr(conn, "connected_at", 0.0) or now)
                self._count(conn.id, ident, session.publish_stats, now, counts)
        self._add_counts(counts)

    def _count(self, conn_id: int, ident: str, published: Mapping[bytes, Any], now: float, counts: _Counts) -> None:
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
            key = (ident, chan, minute)
            summed = counts.get(key)
            delta = count - (before or 0)
            counts[key] = (delta, now) if summed is None else (summed[0] + delta, max(summed[1], now))

    def _add_counts(self, counts: _Counts) -> None:
        for (ident, chan, minute), (delta, now) in counts.items():
            self._add(ident, chan, delta, minute, now)

    def _add(self, ident: str, chan: bytes, delta: int, minute: int, now: float) -> None:
        channel = chan.decode("utf-8", "backslashreplace")
        key = (ident, channel)
        act = self.pairs.get(key)
        if act is None:
            act = self.pairs[key] = Activity()
            self.channels_of.setdefault(ident, {})[channel] = None
            if len(self.pairs) > MAX_PAIRS:
                old_key, _ = self.pairs.popitem(last=False)
                self._forget.forget_pairs.append(old_key)
                chans = self.channels_of.get(old_key[0])
                if chans is not None:
                    chans.pop(old_key[1], None)
                    if not chans:
                        del self.channels_of[old_key[0]]
        else:
            self.pairs.move_to_end(key)
        act.last_publish = now
        act.add(minute, delta)
        self._dirty_pairs.add(key)
        for kind, table, name in (("i", self.idents, ident), ("c", self.chans, channel)):
            hist, evicted = _touch(table, name, History, MAX_HISTORY)
            self._forget.forget_history.extend((kind, e) for e in evicted)
            hist.last_publish = now
            hist.add(minute, delta)
            self._dirty_minutes.add((kind, name, minute))
        _touch(self.published, ident, float, MAX_IDENTS)
        self.published[ident] = now
        self.seen(ident, now)

    def channels(self, ident: str, minute: int) -> dict[str, dict[str, Any]]:
        """One ident's channels: {last_publish, last_5m, last_1h} each."""
        out = {}
        for channel in self.channels_of.get(ident, ()):
            act = self.pairs.get((ident, channel))
            if act is not None:
                out[channel] = act.view(minute)
        return out
