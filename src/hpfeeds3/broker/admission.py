"""Pre-auth fairness: who keeps a slot among the connections not yet authenticated.

A connection counts from the moment it is accepted (a TLS handshake in
progress included) until it authenticates or closes. The pool is bounded
twice: per address group (an IPv4 address, or an IPv6 /64 — one host can
take any address in its /64) and in total. When a bound is reached the new
connection is admitted and the *oldest* pre-auth connection is closed instead
— the oldest of that address, or, for the total, the oldest of the busiest
address. So a flood of silent connections only ever evicts its own: a
sensor that arrives during the flood authenticates in a round trip, long
before the flood's next connections could push it out, even when it shares
the attacker's address behind a NAT.

Every operation is O(1): connections are kept in insertion order per address,
and addresses in buckets by how many slots they hold.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Generic, TypeVar

T = TypeVar("T")


@functools.lru_cache(maxsize=65536)
def address_group(host: str) -> str:
    """The unit that gets a fair share: an IPv4 address, or the /64 of an IPv6 address."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


class PreAuthPool(Generic[T]):
    """Members (connections) by address group, with O(1) admission and eviction."""

    __slots__ = ("_by_group", "_groups_by_count", "_max_count", "limit_per_group", "limit_total", "total")

    def __init__(self, limit_total: int, limit_per_group: int) -> None:
        self.limit_total = limit_total
        self.limit_per_group = limit_per_group
        self.total = 0
        # group -> its members, oldest first (a dict keeps insertion order)
        self._by_group: dict[str, dict[T, None]] = {}
        # n -> the groups holding exactly n members (oldest to reach n first)
        self._groups_by_count: dict[int, dict[str, None]] = {}
        self._max_count = 0

    def admit(self, member: T, group: str) -> tuple[T | None, str]:
        """Add ``member``; returns (a member to close now or None, which bound it was over)."""
        members = self._by_group.setdefault(group, {})
        members[member] = None
        self._moved(group, len(members) - 1, len(members))
        self.total += 1
        if len(members) > self.limit_per_group:
            return next(iter(members)), "address"
        if self.total > self.limit_total:
            return self.oldest_of_busiest(), "total"
        return None, ""

    def oldest_of_busiest(self) -> T | None:
        """The member to close when room must be made: the oldest of the address holding the most."""
        if not self.total:
            return None
        busiest = next(iter(self._groups_by_count[self._max_count]))
        return next(iter(self._by_group[busiest]))

    def remove(self, member: T, group: str) -> None:
        members = self._by_group.get(group)
        if members is None or member not in members:
            return
        del members[member]
        self.total -= 1
        self._moved(group, len(members) + 1, len(members))
        if not members:
            del self._by_group[group]

    def count(self, group: str) -> int:
        return len(self._by_group.get(group, ()))

    def _moved(self, group: str, old: int, new: int) -> None:
        if old:
            bucket = self._groups_by_count[old]
            del bucket[group]
            if not bucket:
                del self._groups_by_count[old]
        if new:
            self._groups_by_count.setdefault(new, {})[group] = None
        # Counts change by one: the maximum moves by at most one.
        if new > self._max_count or (old == self._max_count and old not in self._groups_by_count):
            self._max_count = new
