"""The failed-AUTH limiter on a clock the test drives (every call takes ``now``)."""

from __future__ import annotations

from hpfeeds3.broker.ratelimit import AuthFailureLimiter, AuthLimits

LIMITS = AuthLimits(per_ident=15, per_address=100, window_s=60.0, block_s=300.0)


def test_failures_spread_wider_than_the_window_never_block() -> None:
    """One failure every 30 s: at most two in any 60 s window, however long it goes on."""
    limiter = AuthFailureLimiter(LIMITS)
    for i in range(200):
        now = 1000.0 + 30.0 * i
        assert limiter.record_failure("10.0.0.1", "sensor", now) is None, f"blocked after {i + 1} failures"
        assert not limiter.blocked("10.0.0.1", "sensor", now + 1)


def test_failures_within_the_window_block_that_pair_for_the_block_time() -> None:
    limiter = AuthFailureLimiter(LIMITS)
    started = [limiter.record_failure("10.0.0.1", "sensor", 1000.0 + i) for i in range(15)]
    assert started[:14] == [None] * 14
    assert started[14] is not None and "15 failed AUTHs for 'sensor'" in started[14]
    assert limiter.blocked("10.0.0.1", "sensor", 1015.0)
    assert not limiter.blocked("10.0.0.1", "other", 1015.0)  # the neighbours' idents
    assert not limiter.blocked("10.0.0.2", "sensor", 1015.0)  # and other addresses
    assert limiter.blocked_for("10.0.0.1", "sensor", 1015.0) == 300.0 - 1.0
    assert not limiter.blocked("10.0.0.1", "sensor", 1014.0 + 300.0 + 0.1)


def test_per_address_limit_counts_over_all_idents_of_a_slash_64() -> None:
    limiter = AuthFailureLimiter(AuthLimits(per_ident=0, per_address=5, window_s=60.0, block_s=10.0))
    results = [limiter.record_failure(f"2001:db8::{i}", f"ident{i}", 100.0 + i) for i in range(5)]
    assert results[:4] == [None] * 4 and results[4] is not None
    assert limiter.blocked("2001:db8::ffff", "anyone", 105.0)
