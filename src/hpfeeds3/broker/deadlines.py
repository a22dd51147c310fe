"""Deadlines of one length for many connections, on one loop timer.

Every connection has a deadline to finish its TLS handshake, then one to
authenticate. Each is set when the wait starts and is the same length for every
connection, so the connections waiting sit in a dict in deadline order: setting
one is a dict insert, and clearing it (almost every connection clears its AUTH
deadline a few milliseconds later) a dict delete. A loop timer per connection
cost more than the rest of a plain handshake's deadline handling: its
allocation, and the loop's timer heap on the way in and again at the cancel.

One timer waits for the first deadline. When it fires, every connection whose
deadline has passed is handed to ``on_due``, oldest first, and it waits for the
next. A deadline is met up to ``slack_s`` late, so that deadlines close together
are handled by one wake-up: a flood of silent connections costs the loop at most
one wake-up per ``slack_s``, not one per connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# How late a deadline may be met: what one wake-up gathers.
DEADLINE_SLACK_S = 0.05


class Deadlines(Generic[T]):
    """Members with a deadline ``delay_s`` after they were added."""

    __slots__ = ("_due", "_loop", "_on_due", "_slack_s", "_timer", "delay_s")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        delay_s: float,
        on_due: Callable[[T], None],
        slack_s: float = DEADLINE_SLACK_S,
    ) -> None:
        """``on_due(member)`` runs on the loop when ``member``'s deadline has passed; it must not
        raise (the broker's run inside the connection's boundary) and may add or discard members."""
        self._loop = loop
        self.delay_s = delay_s
        self._on_due = on_due
        self._slack_s = slack_s
        self._due: dict[T, float] = {}  # member -> loop time of its deadline, in that order
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, member: object) -> bool:
        return member in self._due

    def add(self, member: T) -> None:
        """``member``'s deadline is ``delay_s`` from now (a deadline it had is replaced)."""
        due = self._due
        if member in due:
            del due[member]  # to the end: the order is the deadlines'
        at = due[member] = self._loop.time() + self.delay_s
        if self._timer is None:
            self._timer = self._loop.call_at(at + self._slack_s, self._fire)

    def discard(self, member: T) -> None:
        """``member`` has no deadline here any more (the timer, if any, finds out when it fires)."""
        self._due.pop(member, None)

    def close(self) -> None:
        """No deadline is met any more (the broker is stopping)."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        due = self._due
        now = self._loop.time()
        passed: list[T] = []
        for member, at in due.items():  # one pass (deleting while looking for the first would rescan)
            if at > now:
                break
            passed.append(member)
        for member in passed:
            deadline = due.get(member)
            if deadline is not None and deadline <= now:  # not cleared, nor set again, by an earlier one's on_due
                del due[member]
                self._on_due(member)
        if due and self._timer is None:
            self._timer = self._loop.call_at(next(iter(due.values())) + self._slack_s, self._fire)
