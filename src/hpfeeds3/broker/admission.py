"""Pre-auth fairness: who keeps a slot among the connections not yet authenticated.

A connection counts from the moment it is accepted (a TLS handshake in
progress included) until it authenticates or closes. The pool is bounded
twice: per address (an IPv4 address, or an IPv6 /64 — one host can take any
address in its /64) and in total.

Who is closed to make room is chosen among the *idle* members: a connection
whose bytes are arriving (a TLS handshake, an AUTH frame) is making progress
and is left alone while it does (``PROGRESS_WINDOW_S`` since its last bytes).
Among the idle, the pool looks at networks first (IPv4 /24, IPv6 /48), then
at addresses within the busiest network, then takes that address's oldest. So
a flood of silent connections evicts its own, from one address or from
thousands in a few networks: a slow sensor elsewhere keeps its slot for as
long as the flood's networks hold more idle connections than its own.

Bytes that have arrived but are not read yet (a ClientHello queued behind
the accepts of a storm) count too: a candidate is asked (``has_bytes``) before
it is named, and one with bytes waiting is making progress.

When the pool is full and every member is making progress (a reconnect
storm), nobody is cut; nor while nearly all are (fewer than
1/``IDLE_SHARE_TO_EVICT`` idle: a storm's members accepted a moment ago,
their first bytes on the way): ``has_room`` says so and the broker holds the
newcomer back, unread, until a slot frees, or for ``HELD_BACK_MAX_S`` at
most: then it is admitted ``over_bound`` (state.py), before its client gives
up. So the total is a bound on what is evicted for, and on how many start at
once; the descriptor limit and the per-address bound are the hard ones. While
the pool is over its bound nobody is evicted for a newcomer: that would keep
the pool as far over it and turn an idle member (a sensor a long round trip
away, or one whose client is slow to answer) into a retry.

Every operation is O(1): members are kept in insertion order per address,
and addresses (and networks) in buckets by how many idle members they hold.
A member enters those buckets when a decision needs them (at a bound, when
the progressing expire), not at its admission: most members authenticate
and leave long before, and ranking them would be undone a moment later. The
counts are then what they would have been; of two networks (or addresses)
that tie, the one named first may differ.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from typing import Generic, TypeVar

from .tuning import IDLE_SHARE_TO_EVICT, PROGRESS_WINDOW_S

T = TypeVar("T")
K = TypeVar("K")

Groups = tuple[str, str]  # (network, address)


def address_groups(host: str) -> Groups:
    """(network, address) of ``host``: IPv4 (/24, the address); IPv6 (/48, /64)."""
    if ":" not in host:
        # Cheaper than a cache miss, and a storm's addresses are mostly new.
        head, dot, _ = host.rpartition(".")
        return (f"{head}.0/24" if dot else host), host
    return _ipv6_groups(host)


@functools.lru_cache(maxsize=65536)
def _ipv6_groups(host: str) -> Groups:
    """IPv6 parsing costs microseconds: each address once."""
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host, host
    if ip.ipv4_mapped is not None:
        return address_groups(str(ip.ipv4_mapped))
    n = int(ip)
    return f"{ipaddress.IPv6Address(n >> 80 << 80)}/48", f"{ipaddress.IPv6Address(n >> 64 << 64)}/64"


def address_group(host: str) -> str:
    """The unit that gets a fair share: an IPv4 address, or the /64 of an IPv6 address."""
    return address_groups(host)[1]


class _Ranking(Generic[K]):
    """Keys by a count, with the key holding the most found in O(1) (counts move by one)."""

    __slots__ = ("_buckets", "_max", "counts")

    def __init__(self) -> None:
        self.counts: dict[K, int] = {}
        # n -> the keys holding exactly n (oldest to reach n first)
        self._buckets: dict[int, dict[K, None]] = {}
        self._max = 0

    def add(self, key: K, step: int) -> None:
        # Runs several times per handshake: no allocation when a key moves
        # alone (its bucket is moved to the new count) or into a bucket that exists.
        counts = self.counts
        buckets = self._buckets
        old = counts.get(key, 0)
        new = old + step
        moved = None
        if old:
            bucket = buckets[old]
            if len(bucket) == 1:
                moved = buckets.pop(old)  # {key: None}, reused below when it can be
            else:
                del bucket[key]
        if new:
            counts[key] = new
            into = buckets.get(new)
            if into is not None:
                into[key] = None
            else:
                buckets[new] = moved if moved is not None else {key: None}
        else:
            del counts[key]
        if new > self._max or (old == self._max and old not in buckets):
            self._max = new

    def top(self) -> K | None:
        return next(iter(self._buckets[self._max])) if self.counts else None


class PreAuthPool(Generic[T]):
    """Members (connections) by network and address, with O(1) admission and eviction."""

    __slots__ = (
        "_by_address",
        "_fresh",
        "_has_bytes",
        "_idle",
        "_idle_addresses",
        "_networks",
        "_progressing",
        "limit_per_group",
        "limit_total",
        "total",
    )

    def __init__(
        self, limit_total: int, limit_per_group: int, has_bytes: Callable[[T], bool] = lambda member: False
    ) -> None:
        self._has_bytes = has_bytes
        self.limit_total = limit_total
        self.limit_per_group = limit_per_group
        self.total = 0
        # address -> its members, oldest first (a dict keeps insertion order)
        self._by_address: dict[str, dict[T, None]] = {}
        # address -> its idle members, oldest first
        self._idle: dict[str, dict[T, None]] = {}
        # networks ranked by idle members; per network, its addresses ranked likewise
        self._networks: _Ranking[str] = _Ranking()
        self._idle_addresses: dict[str, _Ranking[str]] = {}
        # member -> (when its last bytes came, its groups), least recent first
        self._progressing: dict[T, tuple[float, Groups]] = {}
        # member -> its groups: idle members admitted since the buckets were last
        # brought up to date (_rank_fresh), oldest first
        self._fresh: dict[T, Groups] = {}

    def has_room(self, now: float) -> bool:
        """Whether a newcomer can be admitted: below the bound, or at it with an idle member
        to close while at least 1/IDLE_SHARE_TO_EVICT of the pool is idle (tuning.py: a pool
        nearly all making progress is a storm, its few idle members just accepted). Over it
        (members admitted ``over_bound``) closing one would make no room, only turn a slow
        sensor into a retry: the newcomer waits, as long as the hold at most."""
        total, limit = self.total, self.limit_total
        if total < limit:
            return True
        if total > limit:
            return False
        self._expire(now)
        if (total - len(self._progressing)) * IDLE_SHARE_TO_EVICT < limit:
            return False
        return self.oldest_idle(now) is not None

    def admit(self, member: T, groups: Groups, now: float, over_bound: bool = False) -> tuple[T | None, str]:
        """Add ``member`` (idle); returns (a member to close now or None, which bound it was over).
        ``over_bound``: held back too long (state.py), it may take the pool past its total."""
        address = groups[1]
        members = self._by_address.get(address)
        if members is None:
            members = self._by_address[address] = {member: None}
        else:
            members[member] = None
        self.total += 1
        self._fresh[member] = groups
        if len(members) > self.limit_per_group:
            # One address never holds more: its oldest idle member, else its oldest.
            self._expire(now)
            idle = self._idle.get(address)
            return next(iter(idle or members)), "address"
        if self.total > self.limit_total and not over_bound:
            return self.oldest_idle(now), "total"
        return None, ""

    def oldest_idle(self, now: float) -> T | None:
        """The member to close when room must be made: the oldest idle one of the
        busiest address of the busiest network; None when every member is making progress."""
        self._expire(now)
        while True:
            network = self._networks.top()
            if network is None:
                return None
            address = self._idle_addresses[network].top()
            assert address is not None
            candidate = next(iter(self._idle[address]))
            if not self._has_bytes(candidate):
                return candidate
            self.progress(candidate, (network, address), now)  # its bytes are waiting to be read

    def progress(self, member: T, groups: Groups, now: float) -> None:
        """``member``'s bytes arrived: not a candidate for eviction until it goes quiet."""
        seen = self._progressing.pop(member, None)
        if seen is None and self._fresh.pop(member, None) is None:
            idle = self._idle.get(groups[1])
            if idle is None or member not in idle:
                return  # not in the pool
            self._drop_idle(member, groups, idle)
        self._progressing[member] = (now, groups)

    def expire(self, now: float) -> None:
        """Members quiet for PROGRESS_WINDOW_S are idle again."""
        self._expire(now)

    def remove(self, member: T, groups: Groups) -> None:
        address = groups[1]
        members = self._by_address.get(address)
        if members is None or member not in members:
            return
        del members[member]
        if not members:
            del self._by_address[address]
        self.total -= 1
        if self._progressing.pop(member, None) is None and self._fresh.pop(member, None) is None:
            self._drop_idle(member, groups, self._idle[address])

    def count(self, group: str) -> int:
        return len(self._by_address.get(group, ()))

    def _expire(self, now: float) -> None:
        # Every decision starts here: the fresh members first, as they were admitted
        # before any member that goes idle now.
        if self._fresh:
            self._rank_fresh()
        progressing = self._progressing
        horizon = now - PROGRESS_WINDOW_S
        while progressing:
            member, (seen, groups) = next(iter(progressing.items()))
            if seen > horizon:
                return
            del progressing[member]
            self._add_idle(member, groups)

    def _rank_fresh(self) -> None:
        fresh, self._fresh = self._fresh, {}
        for member, groups in fresh.items():
            self._add_idle(member, groups)

    def _add_idle(self, member: T, groups: Groups) -> None:
        network, address = groups
        idle = self._idle.get(address)
        if idle is None:
            self._idle[address] = {member: None}
        else:
            idle[member] = None
        self._networks.add(network, 1)
        ranking = self._idle_addresses.get(network)
        if ranking is None:
            ranking = self._idle_addresses[network] = _Ranking()
        ranking.add(address, 1)

    def _drop_idle(self, member: T, groups: Groups, idle: dict[T, None]) -> None:
        network, address = groups
        del idle[member]
        if not idle:
            del self._idle[address]
        self._networks.add(network, -1)
        ranking = self._idle_addresses[network]
        ranking.add(address, -1)
        if not ranking.counts:
            del self._idle_addresses[network]
