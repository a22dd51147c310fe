"""Deadlines of one length on one timer (deadlines.py): each met once, in order, never
early and at most the slack late; a cleared one never fires; a flood costs few wake-ups."""

from __future__ import annotations

import asyncio

import pytest

from hpfeeds3.broker.deadlines import Deadlines

DELAY_S = 0.2
SLACK_S = 0.05


def _run(body):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(body(loop))
    finally:
        loop.close()


async def _until(loop: asyncio.AbstractEventLoop, done, timeout_s: float = 5.0) -> None:
    end = loop.time() + timeout_s
    while not done():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


def test_each_deadline_is_met_once_in_order_never_early_and_at_most_the_slack_late() -> None:
    async def body(loop):
        fired: list[tuple[str, float]] = []
        added: dict[str, float] = {}
        deadlines: Deadlines[str] = Deadlines(loop, DELAY_S, lambda m: fired.append((m, loop.time())), SLACK_S)
        for name in ("a", "b", "c"):
            added[name] = loop.time()
            deadlines.add(name)
            await asyncio.sleep(2 * SLACK_S)  # apart by more than the slack: one wake-up each
        await _until(loop, lambda: len(fired) == 3)
        await asyncio.sleep(DELAY_S + 2 * SLACK_S)
        return fired, added, len(deadlines)

    fired, added, left = _run(body)
    assert [m for m, _ in fired] == ["a", "b", "c"]
    for member, at in fired:
        late = at - (added[member] + DELAY_S)
        assert late >= 0, f"{member} met {-late:.3f} s early"
        # The slack, and the loop's own timer granularity and scheduling.
        assert late <= SLACK_S + 0.1, f"{member} met {late:.3f} s late"
    assert left == 0


def test_a_cleared_deadline_never_fires_and_one_set_again_counts_from_then() -> None:
    async def body(loop):
        fired: list[tuple[str, float]] = []
        deadlines: Deadlines[str] = Deadlines(loop, DELAY_S, lambda m: fired.append((m, loop.time())), SLACK_S)
        start = loop.time()
        deadlines.add("cleared")
        deadlines.add("again")
        deadlines.add("kept")
        await asyncio.sleep(DELAY_S / 2)
        deadlines.discard("cleared")
        deadlines.discard("never added")
        again_at = loop.time()
        deadlines.add("again")
        assert "cleared" not in deadlines and "again" in deadlines
        await _until(loop, lambda: len(fired) == 2)
        await asyncio.sleep(DELAY_S + 2 * SLACK_S)
        return fired, start, again_at

    fired, start, again_at = _run(body)
    assert [m for m, _ in fired] == ["kept", "again"]
    assert fired[0][1] >= start + DELAY_S
    assert fired[1][1] >= again_at + DELAY_S


class _Counted(Deadlines[int]):
    """Counts its wake-ups."""

    __slots__ = ("wake_ups",)
    wake_ups: int

    def _fire(self) -> None:
        self.wake_ups += 1
        super()._fire()


def test_a_flood_of_deadlines_is_met_with_one_wake_up_per_slack_at_most() -> None:
    """Ten thousand silent connections, a hundred added per millisecond: every deadline is
    met, by a number of wake-ups bounded by the time they span over the slack, not by their count."""

    async def body(loop):
        fired: list[int] = []
        deadlines = _Counted(loop, DELAY_S, fired.append, SLACK_S)
        deadlines.wake_ups = 0
        start = loop.time()
        for i in range(10_000):
            deadlines.add(i)
            if i % 100 == 99:
                await asyncio.sleep(0.001)
        spread = loop.time() - start
        await _until(loop, lambda: len(fired) == 10_000, timeout_s=10)
        return fired, deadlines.wake_ups, spread

    fired, wake_ups, spread = _run(body)
    assert fired == list(range(10_000))
    assert wake_ups <= spread / SLACK_S + 2


def test_a_member_due_may_clear_or_set_others() -> None:
    async def body(loop):
        fired: list[str] = []
        deadlines: Deadlines[str] = Deadlines(loop, DELAY_S, lambda m: None, SLACK_S)

        def due(member: str) -> None:
            fired.append(member)
            if member == "first":
                deadlines.discard("second")  # passed too, in the same wake-up: cleared, so not met
                deadlines.add("later")

        deadlines._on_due = due  # type: ignore[attr-defined]
        deadlines.add("first")
        deadlines.add("second")
        await _until(loop, lambda: "later" in fired)
        return fired

    assert _run(body) == ["first", "later"]


def test_close_stops_every_deadline() -> None:
    async def body(loop):
        fired: list[str] = []
        deadlines: Deadlines[str] = Deadlines(loop, 0.05, fired.append, 0.01)
        deadlines.add("x")
        deadlines.close()
        await asyncio.sleep(0.2)
        return fired, len(deadlines)

    assert _run(body) == ([], 0)


@pytest.mark.parametrize("slack_s", [0.0, 0.02])
def test_a_deadline_added_while_others_fire_gets_a_timer(slack_s: float) -> None:
    async def body(loop):
        fired: list[str] = []
        deadlines: Deadlines[str] = Deadlines(loop, 0.05, lambda m: None, slack_s)

        def due(member: str) -> None:
            fired.append(member)
            if member == "a":
                deadlines.add("b")  # the only deadline left: a timer must wait for it

        deadlines._on_due = due  # type: ignore[attr-defined]
        deadlines.add("a")
        await _until(loop, lambda: fired == ["a", "b"], timeout_s=2)
        return fired

    assert _run(body) == ["a", "b"]
