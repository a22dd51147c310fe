"""The pre-auth pool's eviction rules (``admission.PreAuthPool``), unit by unit."""

from __future__ import annotations

import random

from hpfeeds3.broker.admission import PreAuthPool, _Ranking, address_group, address_groups
from hpfeeds3.broker.tuning import IDLE_SHARE_TO_EVICT, PROGRESS_WINDOW_S

_clock = [0.0]


def tick() -> float:
    """A later time for each step."""
    _clock[0] += 0.01
    return _clock[0]


def at(address: str) -> tuple[str, str]:
    return address_groups(address)


def test_at_the_total_bound_the_oldest_of_the_busiest_address_is_closed() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=4, limit_per_group=10)
    assert pool.admit("a1", at("10.0.0.1"), tick()) == (None, "")  # the first address to arrive
    for member in ("b1", "b2", "b3"):
        assert pool.admit(member, at("10.0.0.2"), tick()) == (None, "")  # the busiest
    assert pool.admit("c1", at("10.0.0.3"), tick()) == ("b1", "total")
    pool.remove("b1", at("10.0.0.2"))
    assert pool.admit("c2", at("10.0.0.3"), tick()) == ("b2", "total")
    pool.remove("b2", at("10.0.0.2"))
    # Now 10.0.0.3 and 10.0.0.1 hold two each: 10.0.0.3 reached two first.
    assert pool.admit("a2", at("10.0.0.1"), tick()) == ("c1", "total")
    assert pool.total == 5


def test_the_busiest_address_follows_removals() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=3, limit_per_group=10)
    pool.admit("a1", at("10.0.0.1"), tick())
    pool.admit("a2", at("10.0.0.1"), tick())
    pool.admit("b1", at("10.0.0.2"), tick())
    pool.remove("a1", at("10.0.0.1"))
    pool.remove("a2", at("10.0.0.1"))
    pool.admit("c1", at("10.0.0.3"), tick())
    pool.admit("c2", at("10.0.0.3"), tick())
    assert pool.admit("d1", at("10.0.0.4"), tick()) == ("c1", "total")


def test_over_the_per_address_bound_the_oldest_of_that_address_is_closed() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=100, limit_per_group=2)
    pool.admit("b1", at("10.0.0.2"), tick())
    assert pool.admit("a1", at("10.0.0.1"), tick()) == (None, "")
    assert pool.admit("a2", at("10.0.0.1"), tick()) == (None, "")  # at the bound, not over it
    assert pool.admit("a3", at("10.0.0.1"), tick()) == ("a1", "address")


def test_over_the_per_address_bound_the_oldest_idle_of_that_address_is_closed() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=100, limit_per_group=2)
    pool.admit("a1", at("10.0.0.1"), tick())
    pool.admit("a2", at("10.0.0.1"), tick())
    pool.progress("a1", at("10.0.0.1"), now=tick())
    assert pool.admit("a3", at("10.0.0.1"), tick()) == ("a2", "address")


def test_one_network_of_many_addresses_evicts_its_own() -> None:
    """One connection from each of many addresses of a few /24s: every address ties,
    so the oldest overall would be the sensor; the busiest network's is taken instead."""
    pool: PreAuthPool[str] = PreAuthPool(limit_total=8, limit_per_group=10)
    pool.admit("sensor", at("192.0.2.7"), tick())
    for i in range(7):
        pool.admit(f"flood{i}", at(f"198.51.{i % 2}.{i + 1}"), tick())
    for i in range(7, 40):
        evict, bound = pool.admit(f"flood{i}", at(f"198.51.{i % 2}.{i + 1}"), tick())
        assert bound == "total" and evict is not None and evict.startswith("flood")
        pool.remove(evict, at(f"198.51.{int(evict[5:]) % 2}.{int(evict[5:]) + 1}"))
    assert pool.count("192.0.2.7") == 1


def test_a_connection_making_progress_is_not_evicted_until_it_goes_quiet() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=2, limit_per_group=10)
    pool.admit("handshaking", at("10.0.0.1"), tick())
    pool.admit("silent", at("10.0.0.1"), tick())
    pool.progress("handshaking", at("10.0.0.1"), now=100.0)
    assert pool.admit("newcomer", at("10.0.0.2"), tick()) == ("silent", "total")
    pool.remove("silent", at("10.0.0.1"))
    pool.progress("newcomer", at("10.0.0.2"), now=100.5)
    # Full, and both are making progress: no room, nobody to cut.
    assert not pool.has_room(now=100.5 + PROGRESS_WINDOW_S / 2)
    assert pool.oldest_idle(now=100.5 + PROGRESS_WINDOW_S / 2) is None
    # The first goes quiet for the window: it is idle again, a candidate.
    quiet = 100.0 + PROGRESS_WINDOW_S + 0.1
    assert pool.has_room(now=quiet)
    assert pool.oldest_idle(now=quiet) == "handshaking"
    pool.remove("handshaking", at("10.0.0.1"))
    pool.remove("newcomer", at("10.0.0.2"))
    assert pool.total == 0 and pool.has_room(now=200.0)


def test_a_member_with_bytes_waiting_is_making_progress() -> None:
    """A ClientHello that arrived but is not read yet (a storm's accepts come first)."""
    waiting = {"hello"}
    pool: PreAuthPool[str] = PreAuthPool(limit_total=3, limit_per_group=10, has_bytes=lambda m: m in waiting)
    for member in ("hello", "silent1", "silent2"):
        pool.admit(member, at("10.0.0.1"), tick())
    assert pool.admit("newcomer", at("10.0.1.2"), tick()) == ("silent1", "total")
    pool.remove("silent1", at("10.0.0.1"))
    waiting.update(("silent2", "newcomer"))
    assert not pool.has_room(now=tick())


def test_progress_of_a_member_not_in_the_pool_is_ignored() -> None:
    pool: PreAuthPool[str] = PreAuthPool(limit_total=1, limit_per_group=10)
    pool.progress("stranger", at("10.0.0.1"), now=0.0)
    assert pool.total == 0 and pool.has_room(now=0.0)


def test_an_ipv6_host_is_one_address_per_slash_64() -> None:
    assert address_group("2001:db8::1") == address_group("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_group("2001:db8:0:1::1") != address_group("2001:db8::1")
    assert address_group("::ffff:10.0.0.1") == "10.0.0.1"


def test_networks_are_ipv4_slash_24_and_ipv6_slash_48() -> None:
    assert address_groups("10.1.2.3") == ("10.1.2.0/24", "10.1.2.3")
    assert address_groups("2001:db8:1:2::5") == ("2001:db8:1::/48", "2001:db8:1:2::/64")
    assert address_groups("::ffff:10.1.2.3") == ("10.1.2.0/24", "10.1.2.3")


def test_the_ranking_names_the_key_that_reached_the_highest_count_first() -> None:
    """``_Ranking`` against a model (counts, and when each key reached its count), over random
    moves by one: the top is the key with the most, the earliest to get there among equals."""
    rng = random.Random(24)
    for _round in range(200):
        ranking: _Ranking[str] = _Ranking()
        model: dict[str, tuple[int, int]] = {}  # key -> (count, when it reached it)
        for step in range(rng.randint(1, 60)):
            key = rng.choice("abcde")
            count = model.get(key, (0, 0))[0]
            move = 1 if count == 0 or rng.random() < 0.55 else -1
            ranking.add(key, move)
            if count + move:
                model[key] = (count + move, step)
            else:
                del model[key]
            expected = min(model, key=lambda k: (-model[k][0], model[k][1])) if model else None
            assert ranking.top() == expected, (model, ranking.counts)
            assert ranking.counts == {k: c for k, (c, _) in model.items()}


def test_a_member_admitted_over_the_bound_closes_nobody_and_the_address_bound_holds() -> None:
    """Held back too long (state.py), a newcomer is admitted past the total; its
    address's bound still holds."""
    pool: PreAuthPool[str] = PreAuthPool(limit_total=2, limit_per_group=2)
    pool.admit("a1", at("10.0.0.1"), tick())
    pool.admit("b1", at("10.0.1.1"), tick())
    for member, address in (("a1", "10.0.0.1"), ("b1", "10.0.1.1")):
        pool.progress(member, at(address), tick())
    assert not pool.has_room(tick())
    assert pool.admit("c1", at("10.0.2.1"), tick(), over_bound=True) == (None, "")
    assert pool.total == 3
    pool.admit("a2", at("10.0.0.1"), tick(), over_bound=True)
    assert pool.admit("a3", at("10.0.0.1"), tick(), over_bound=True) == ("a2", "address")


def test_a_pool_nearly_all_making_progress_holds_a_newcomer_back_rather_than_cut_its_few_idle() -> None:
    """A TLS reconnect storm: the pool is full of handshakes in progress, and the few
    idle members were accepted a moment ago, their ClientHello on its way. Cutting
    one for a newcomer (as silent as it) only turns a sensor into a retry."""
    limit = 16
    pool: PreAuthPool[str] = PreAuthPool(limit_total=limit, limit_per_group=limit)
    now = 50.0
    for i in range(limit):
        pool.admit(f"m{i}", at(f"10.0.{i}.1"), now)
    for i in range(limit - limit // IDLE_SHARE_TO_EVICT + 1):
        pool.progress(f"m{i}", at(f"10.0.{i}.1"), now)
    assert pool.oldest_idle(now) is not None, "there is an idle member to cut"
    assert not pool.has_room(now), "fewer than 1/IDLE_SHARE_TO_EVICT idle: the newcomer waits"
    # Once they all go quiet for the window, the pool is cut for newcomers as before.
    assert pool.has_room(now + PROGRESS_WINDOW_S + 0.1)


def test_a_pool_of_silent_members_is_cut_for_a_newcomer() -> None:
    """A flood of connections that never speak: the share of idle members is the whole pool."""
    limit = 16
    pool: PreAuthPool[str] = PreAuthPool(limit_total=limit, limit_per_group=limit)
    for i in range(limit):
        pool.admit(f"s{i}", at(f"10.1.{i}.1"), 10.0)
    for i in range(limit - limit // IDLE_SHARE_TO_EVICT):
        pool.progress(f"s{i}", at(f"10.1.{i}.1"), 10.0)
    # Exactly the share idle: still cut, the oldest idle first.
    assert pool.has_room(10.0)
    assert pool.oldest_idle(10.0) == f"s{limit - limit // IDLE_SHARE_TO_EVICT}"
