"""The failed-AUTH limiter: constant work per failure at any fill, IPv6 by /64.

A limiter that scans its table when full lets whoever fills it (one failed AUTH
per source address) stall the event loop for every later failure. Work is
counted as Python lines run inside ratelimit.py (tests/support/opcount.py), so
the assertion does not depend on the machine's load; timings are printed with
``-s`` only.
"""

from __future__ import annotations

import ipaddress
import statistics
import time

from hpfeeds3.broker import ratelimit
from hpfeeds3.broker.ratelimit import MAX_TRACKED, AuthFailureLimiter, AuthLimits
from tests.support.opcount import lines_run

LIMITS = AuthLimits(per_ident=15, per_address=100, window_s=60.0, block_s=300.0)


def _address(i: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + i))  # 10.0.0.0/8: 16 M distinct addresses


def _fill(limiter: AuthFailureLimiter, n: int, now: float) -> None:
    for i in range(n):
        limiter.record_failure(_address(i), "guess", now)


def _cost(limiter: AuthFailureLimiter, start: int, now: float) -> tuple[int, float]:
    """Lines run by one failure from a new address (the worst case: a new entry,
    and at the bound an eviction), and the median seconds of 200 such failures."""
    lines = lines_run(ratelimit, lambda: limiter.record_failure(_address(start), "guess", now))
    times = []
    for i in range(1, 201):
        t = time.perf_counter()
        limiter.record_failure(_address(start + i), "guess", now)
        times.append(time.perf_counter() - t)
    return lines, statistics.median(times)


def test_a_failed_auth_costs_the_same_with_the_table_full_as_empty() -> None:
    now = 1000.0
    empty = AuthFailureLimiter(LIMITS)
    empty_lines, empty_s = _cost(empty, 0, now)

    full = AuthFailureLimiter(LIMITS)
    _fill(full, MAX_TRACKED + 10, now)  # every entry inside its window: nothing has expired
    full_lines, full_s = _cost(full, 10 * MAX_TRACKED, now)
    print(
        f"\nfailed AUTH from a new address: empty table {empty_lines} lines, {empty_s * 1e6:.1f} µs median;"
        f" full table ({MAX_TRACKED:,} entries) {full_lines} lines, {full_s * 1e6:.1f} µs median"
    )
    assert full_lines <= empty_lines + 20, (empty_lines, full_lines)
    # and the bound holds
    assert full.tracked() <= 4 * MAX_TRACKED


def test_a_full_table_of_expired_entries_is_not_scanned_either() -> None:
    limiter = AuthFailureLimiter(LIMITS)
    _fill(limiter, MAX_TRACKED, 1000.0)
    later = 1000.0 + LIMITS.window_s + LIMITS.block_s + 1  # every entry has expired
    lines = lines_run(ratelimit, lambda: limiter.record_failure("192.0.2.1", "guess", later))
    empty_lines = lines_run(ratelimit, lambda: AuthFailureLimiter(LIMITS).record_failure("192.0.2.1", "guess", later))
    print(f"\nfirst failure after {MAX_TRACKED:,} entries expired: {lines} lines (empty table: {empty_lines})")
    assert lines <= empty_lines + 40, (empty_lines, lines)


def test_a_block_outlives_a_flood_of_other_failures() -> None:
    """Filling the table from many addresses must not evict a block before it ends."""
    limiter = AuthFailureLimiter(LIMITS)
    now = 1000.0
    for _ in range(LIMITS.per_address):
        limiter.record_failure("198.51.100.7", "x", now)
    assert limiter.blocked("198.51.100.7", "y", now + 1)
    _fill(limiter, 2 * MAX_TRACKED, now + 2)
    assert limiter.blocked("198.51.100.7", "y", now + 3)
    assert not limiter.blocked("198.51.100.7", "y", now + LIMITS.block_s + 1)


def test_5000_guesses_from_one_ipv6_64_are_refused() -> None:
    """One host owns a whole /64: rotating the low 64 bits must not escape the per-address limit."""
    limiter = AuthFailureLimiter(LIMITS)
    net = ipaddress.IPv6Network("2001:db8:1234:5678::/64")
    now = 1000.0
    refused = 0
    for i in range(5000):
        address = str(net[1 + i * 7919])
        now += 0.001
        if limiter.blocked(address, f"guess-{i}", now):
            refused += 1
            continue
        limiter.record_failure(address, f"guess-{i}", now)
    print(f"\n5,000 guesses from one /64, each from its own address: {refused:,} refused")
    assert refused == 5000 - LIMITS.per_address
    # a neighbour in another /64 is not blocked; nor is IPv4
    assert not limiter.blocked("2001:db8:1234:5679::1", "guess-0", now)
    assert not limiter.blocked("192.0.2.1", "guess-0", now)


def test_ipv4_mapped_ipv6_is_keyed_as_its_ipv4_address() -> None:
    limiter = AuthFailureLimiter(LIMITS)
    for _ in range(LIMITS.per_address):
        limiter.record_failure("::ffff:192.0.2.9", "x", 1000.0)
    assert limiter.blocked("192.0.2.9", "y", 1001.0)
    assert not limiter.blocked("192.0.2.10", "y", 1001.0)
