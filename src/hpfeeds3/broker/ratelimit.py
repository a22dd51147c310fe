"""Failed-AUTH limiter: brute force locks out the guesser, not the neighbours.

Failures (wrong secret or unknown ident — garbage is closed anyway) are counted
per (source, ident) and per source. Over either limit within the window, that
pair (or that whole source) is refused for the block time without a key lookup
or a secret verification, so a flood of guesses costs almost nothing. A
misconfigured sensor locks out only its own ident, not the other sensors
behind the same NAT.

A source is an IPv4 address, or an IPv6 /64: one host is routinely given a
whole /64, so its addresses one by one would be free guesses.

Constant work per failure, whatever the fill — whoever can fail an AUTH must
not be able to make the next failure expensive:

- the failure counts are kept in insertion-ordered tables, least recently
  failed first; each failure moves its entry to the end, drops at most a few
  expired entries from the front and, at ``MAX_TRACKED`` entries, evicts the
  front one. Nothing is ever scanned.
- blocks live in tables of their own, ordered by expiry (every block lasts
  ``block_s``), so a flood of new failures cannot evict a block that is still
  running (only more than ``MAX_TRACKED`` blocks at once would, soonest-ending
  first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .admission import address_group

# Most (source, ident) pairs and sources tracked at once, per table: about
# 200 bytes each, so the four tables stay under ~100 MiB however many addresses fail.
MAX_TRACKED = 100_000
# Expired entries dropped from the front of a table per failure: more than one,
# so the table shrinks back after a flood; a constant, so no failure pays for it.
_PRUNE_PER_CALL = 4


V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class AuthLimits:
    per_ident: int = 15  # failures per (address, ident) within the window; 0 disables
    per_address: int = 100  # failures per address over all idents within the window; 0 disables
    window_s: float = 60.0
    block_s: float = 300.0


# The unit a limit applies to: the IPv4 address, or the IPv6 /64 (one host
# can take any address in its /64), as for the pre-auth pool.
source_key = address_group


class _Failures:
    """One table: recent failure times per key, least recently failed first, and
    the running blocks, soonest-ending first."""

    __slots__ = ("blocks", "counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: OrderedDict[object, deque[float]] = OrderedDict()
        self.blocks: OrderedDict[object, float] = OrderedDict()

    def blocked(self, key: object, now: float) -> bool:
        until = self.blocks.get(key)
        return until is not None and until > now

    def remaining(self, key: object, now: float) -> float:
        until = self.blocks.get(key)
        return until - now if until is not None and until > now else 0.0

    def record(self, key: object, now: float, limits: AuthLimits) -> bool:
        """Count a failure; True when it starts a block."""
        window_start = now - limits.window_s
        counts = self.counts
        failures = counts.get(key)
        if failures is None:
            failures = counts[key] = deque(maxlen=self.limit)
            if len(counts) > MAX_TRACKED:
                counts.popitem(last=False)
        else:
            counts.move_to_end(key)
            while failures and failures[0] < window_start:
                failures.popleft()
        failures.append(now)
        _drop_expired(counts, lambda f: bool(f) and f[-1] >= window_start)
        _drop_expired(self.blocks, lambda until: until > now)
        if len(failures) < self.limit or self.blocked(key, now):
            return False
        failures.clear()
        self.blocks.pop(key, None)
        self.blocks[key] = now + limits.block_s  # the latest expiry: at the end, the order holds
        if len(self.blocks) > MAX_TRACKED:
            self.blocks.popitem(last=False)
        return True


def _drop_expired(table: OrderedDict[object, V], live: Callable[[V], bool]) -> None:
    """Drop up to ``_PRUNE_PER_CALL`` entries from the front while they are no longer live."""
    for _ in range(_PRUNE_PER_CALL):
        if not table:
            return
        key = next(iter(table))
        if live(table[key]):
            return
        del table[key]


class AuthFailureLimiter:
    def __init__(self, limits: AuthLimits) -> None:
        self.limits = limits
        self._pairs = _Failures(limits.per_ident)
        self._addresses = _Failures(limits.per_address)

    @property
    def enabled(self) -> bool:
        return bool(self.limits.per_ident or self.limits.per_address)

    @property
    def blocking(self) -> bool:
        """Some address (or address and ident) is blocked, or was until recently: without
        one, every AUTH is let through without computing its source key."""
        return bool(self._addresses.blocks or self._pairs.blocks)

    def blocked(self, address: str, ident: str, now: float) -> bool:
        source = source_key(address)
        return self._addresses.blocked(source, now) or self._pairs.blocked((source, ident), now)

    def address_blocked(self, address: str, now: float) -> bool:
        """The whole address (IPv6: its /64) is blocked, whatever the ident."""
        return self._addresses.blocked(source_key(address), now)

    def blocked_for(self, address: str, ident: str, now: float) -> float:
        """Seconds until this address (or address and ident) may try again; 0 when not blocked."""
        source = source_key(address)
        return max(self._addresses.remaining(source, now), self._pairs.remaining((source, ident), now))

    def record_failure(self, address: str, ident: str, now: float) -> str | None:
        """Count a failure; returns a description when this failure starts a block."""
        lim = self.limits
        source = source_key(address)
        started = None
        if lim.per_ident and self._pairs.record((source, ident), now, lim):
            started = f"{lim.per_ident} failed AUTHs for {ident!r} from {source} within {lim.window_s:g} s"
        if lim.per_address and self._addresses.record(source, now, lim):
            started = f"{lim.per_address} failed AUTHs from {source} within {lim.window_s:g} s"
        return started

    def tracked(self) -> int:
        """Entries held over all tables (each at most ``MAX_TRACKED``)."""
        return sum(len(t.counts) + len(t.blocks) for t in (self._pairs, self._addresses))
