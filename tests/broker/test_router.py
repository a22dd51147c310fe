"""Router: subscription changes cost the same with 3 or 3,000 subscribers on a
channel, and fan-out sees every change.

Work is counted as Python lines run in router.py plus the subscribers' own
``__eq__`` calls (a tuple membership test compares against every element), so
no assertion depends on the machine's load.
"""

from __future__ import annotations

from hpfeeds3.broker import router as router_module
from hpfeeds3.broker.router import Router
from tests.support.opcount import lines_run

CHANNEL = b"crowded"


class Sub:
    """A subscriber that records deliveries and counts equality comparisons."""

    compared = 0

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def deliver(self, data: bytes) -> None:
        self.got.append(data)

    def delivery_failed(self) -> None:
        raise AssertionError("no delivery fails here")

    def __eq__(self, other: object) -> bool:
        Sub.compared += 1
        return self is other

    def __hash__(self) -> int:
        return id(self)


def _toggle_cost(subscribers: int) -> tuple[int, int]:
    router = Router()
    for _ in range(subscribers):
        router.subscribe(CHANNEL, Sub())
    router.publish(CHANNEL, b"warm", 1)
    toggler = Sub()

    def toggle() -> None:
        for _ in range(10):
            router.subscribe(CHANNEL, toggler)
            router.unsubscribe(CHANNEL, toggler)

    Sub.compared = 0
    lines = lines_run(router_module, toggle)
    return lines, Sub.compared


def test_subscribe_unsubscribe_cost_does_not_grow_with_the_subscribers() -> None:
    few_lines, few_eq = _toggle_cost(3)
    many_lines, many_eq = _toggle_cost(3000)
    print(f"\n10 toggles: 3 subscribers {few_lines} lines {few_eq} __eq__; 3,000: {many_lines} lines {many_eq} __eq__")
    assert many_lines == few_lines
    assert many_eq <= 20


def test_publishing_after_many_changes_builds_the_fan_out_once() -> None:
    router = Router()
    subs = [Sub() for _ in range(3000)]
    for s in subs:
        router.subscribe(CHANNEL, s)
    toggler = Sub()
    for _ in range(100):
        router.subscribe(CHANNEL, toggler)
        router.unsubscribe(CHANNEL, toggler)
    first = lines_run(router_module, lambda: router.publish(CHANNEL, b"one", 1))  # builds the fan-out once
    steady = lines_run(router_module, lambda: router.publish(CHANNEL, b"two", 1))
    print(f"\npublish to 3,000 subscribers after 200 changes: {first} lines; next publish: {steady} lines")
    assert first <= steady + 10  # the rebuild is one step, not a Python loop per change or per subscriber
    assert all(s.got == [b"one", b"two"] for s in subs)
    assert toggler.got == []


def test_fan_out_follows_every_change_in_order() -> None:
    router = Router()
    a, b, c = Sub(), Sub(), Sub()
    assert router.subscribe(CHANNEL, a) and router.subscribe(CHANNEL, b)
    assert not router.subscribe(CHANNEL, a)  # idempotent
    router.publish(CHANNEL, b"1", 1)
    assert router.unsubscribe(CHANNEL, a)
    assert not router.unsubscribe(CHANNEL, a)
    router.subscribe(CHANNEL, c)
    router.publish(CHANNEL, b"2", 1)
    assert (a.got, b.got, c.got) == ([b"1"], [b"1", b"2"], [b"2"])
    assert router.subscribers(CHANNEL) == (b, c)
    assert router.deliveries[CHANNEL] == 4
    router.unsubscribe(CHANNEL, b)
    router.unsubscribe(CHANNEL, c)
    assert router.channels() == [] and router.subscribers(CHANNEL) == ()
    router.publish(CHANNEL, b"3", 1)
    assert c.got == [b"2"]


def test_a_subscriber_leaving_during_fan_out_does_not_disturb_it() -> None:
    router = Router()
    got: list[str] = []

    class Leaver(Sub):
        def deliver(self, data: bytes) -> None:
            got.append("leaver")
            router.unsubscribe(CHANNEL, self)
            router.unsubscribe(CHANNEL, other)

    class Other(Sub):
        def deliver(self, data: bytes) -> None:
            got.append("other")

    leaver, other = Leaver(), Other()
    router.subscribe(CHANNEL, leaver)
    router.subscribe(CHANNEL, other)
    router.publish(CHANNEL, b"x", 1)
    assert got == ["leaver", "other"]  # the fan-out of this publish was fixed when it began
    router.publish(CHANNEL, b"y", 1)
    assert got == ["leaver", "other"]


class RecordingBackplane:
    """Records what the router tells the backplane (forwarded publishes ignored)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []

    def want(self, channel: bytes) -> None:
        self.events.append(("want", channel))

    def unwant(self, channel: bytes) -> None:
        self.events.append(("unwant", channel))

    def forward(self, channel: bytes, data: bytes, count: int) -> None:
        pass


def test_the_backplane_hears_of_the_first_and_last_subscriber_only() -> None:
    backplane = RecordingBackplane()
    router = Router(backplane)  # type: ignore[arg-type]
    a, b = Sub(), Sub()
    router.subscribe(CHANNEL, a)
    router.subscribe(CHANNEL, b)
    router.unsubscribe(CHANNEL, a)
    router.unsubscribe(CHANNEL, b)
    router.subscribe(CHANNEL, a)
    assert backplane.events == [("want", CHANNEL), ("unwant", CHANNEL), ("want", CHANNEL)]
