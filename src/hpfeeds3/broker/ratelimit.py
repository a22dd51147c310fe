"""Failed-AUTH limiter: brute force locks out the guesser, not the neighbours.

Failures (wrong secret or unknown ident — garbage is closed anyway) are counted
per (source address, ident) and per source address. Over either limit within
the window, that pair (or that whole address) is refused for the block time
without a key lookup or a secret verification, so a flood of guesses costs
almost nothing. A misconfigured sensor locks out only its own ident, not the
other sensors behind the same NAT.

Memory is bounded: entries are pruned when their window has passed, and at
most ``MAX_TRACKED`` pairs are kept (the oldest are dropped first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

# Most (address, ident) pairs and addresses tracked at once.
MAX_TRACKED = 100_000


@dataclass(frozen=True, slots=True)
class AuthLimits:
    per_ident: int = 15  # failures per (address, ident) within the window; 0 disables
    per_address: int = 100  # failures per address over all idents within the window; 0 disables
    window_s: float = 60.0
    block_s: float = 300.0


class _Entry:
    __slots__ = ("blocked_until", "failures")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.blocked_until = 0.0


class AuthFailureLimiter:
    def __init__(self, limits: AuthLimits) -> None:
        self.limits = limits
        self._pairs: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._addresses: OrderedDict[str, _Entry] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.limits.per_ident or self.limits.per_address)

    def blocked(self, address: str, ident: str, now: float) -> bool:
        a = self._addresses.get(address)
        if a is not None and a.blocked_until > now:
            return True
        p = self._pairs.get((address, ident))
        return p is not None and p.blocked_until > now

    def record_failure(self, address: str, ident: str, now: float) -> str | None:
        """Count a failure; returns a description when this failure starts a block."""
        lim = self.limits
        started = None
        if lim.per_ident and self._count(self._pairs, (address, ident), now, lim.per_ident):
            started = f"{lim.per_ident} failed AUTHs for {ident!r} from {address} within {lim.window_s:g} s"
        if lim.per_address and self._count(self._addresses, address, now, lim.per_address):
            started = f"{lim.per_address} failed AUTHs from {address} within {lim.window_s:g} s"
        return started

    def _count(self, table: OrderedDict, key: object, now: float, limit: int) -> bool:
        entry = table.get(key)
        if entry is None:
            entry = table[key] = _Entry()
            if len(table) > MAX_TRACKED:
                self._prune(table, now)
        else:
            table.move_to_end(key)
        window_start = now - self.limits.window_s
        failures = entry.failures
        while failures and failures[0] < window_start:
            failures.popleft()
        failures.append(now)
        if len(failures) >= limit and entry.blocked_until <= now:
            entry.blocked_until = now + self.limits.block_s
            failures.clear()
            return True
        return False

    def _prune(self, table: OrderedDict, now: float) -> None:
        window_start = now - self.limits.window_s
        for key in [
            k for k, e in table.items() if e.blocked_until <= now and (not e.failures or e.failures[-1] < window_start)
        ]:
            del table[key]
        while len(table) > MAX_TRACKED:
            table.popitem(last=False)
