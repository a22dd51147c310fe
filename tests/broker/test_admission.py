"""The pre-auth pool's eviction rules (``admission.PreAuthPool``), unit by unit."""

from __future__ import annotations

from hpfeeds3.broker.admission import PreAuthPool, address_group


def test_at_the_total_bound_the_oldest_of_the_busiest_address_is_closed() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=4, limit_per_group=10)
    assert pool.admit("a1", "10.0.0.1") == (None, "")  # the first address to arrive
    for member in ("b1", "b2", "b3"):
        assert pool.admit(member, "10.0.0.2") == (None, "")  # the busiest
    assert pool.admit("c1", "10.0.0.3") == ("b1", "total")
    pool.remove("b1", "10.0.0.2")
    assert pool.admit("c2", "10.0.0.3") == ("b2", "total")
    pool.remove("b2", "10.0.0.2")
    # Now 10.0.0.3 and 10.0.0.1 hold two each: 10.0.0.3 reached two first.
    assert pool.admit("a2", "10.0.0.1") == ("c1", "total")
    assert pool.total == 5


def test_the_busiest_address_follows_removals() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=3, limit_per_group=10)
    pool.admit("a1", "10.0.0.1")
    pool.admit("a2", "10.0.0.1")
    pool.admit("b1", "10.0.0.2")
    pool.remove("a1", "10.0.0.1")
    pool.remove("a2", "10.0.0.1")
    pool.admit("c1", "10.0.0.3")
    pool.admit("c2", "10.0.0.3")
    assert pool.admit("d1", "10.0.0.4") == ("c1", "total")


def test_over_the_per_address_bound_the_oldest_of_that_address_is_closed() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=100, limit_per_group=2)
    pool.admit("b1", "10.0.0.2")
    assert pool.admit("a1", "10.0.0.1") == (None, "")
    assert pool.admit("a2", "10.0.0.1") == (None, "")  # at the bound, not over it
    assert pool.admit("a3", "10.0.0.1") == ("a1", "address")


def test_an_ipv6_host_is_one_address_per_slash_64() -> None:
    assert address_group("2001:db8::1") == address_group("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_group("2001:db8:0:1::1") != address_group("2001:db8::1")
    assert address_group("::ffff:10.0.0.1") == "10.0.0.1"
