"""The connection's clock-driven policies, as plain objects fed ``now``.

No event loop and no clock here: the connection owns the timers and calls
these with ``loop.time()``; the tests call them with a fake clock
(``tests/broker/test_policies.py``).

- ``SlowConsumerWatch``: a subscriber whose outgoing buffer passed the
  transport's high-water mark is watched every ``BACKLOG_CHECK_S`` and cut
  above the hard bound, above the soft bound for the soft window, or when
  nothing drained for the stall timeout.
- ``ReceiveRate``: a frame whose header has arrived must arrive at the
  minimum receive rate, after a grace.
- ``Linger``: after a closing ERROR, what the client still sends is read and
  discarded up to a bound, for a while.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BacklogBounds:
    hard_bytes: int
    soft_bytes: int
    soft_window_s: float
    stall_timeout_s: float


class SlowConsumerWatch:
    """One backlogged subscriber's progress. ``check`` returns why to cut it, or None."""

    __slots__ = ("_bounds", "_last_progress", "_last_queued", "_sent_at_check", "_soft_since")

    def __init__(self, bounds: BacklogBounds, now: float, queued: int, sent: int) -> None:
        self._bounds = bounds
        self._last_progress = now
        self._last_queued = queued
        self._sent_at_check = sent
        self._soft_since: float | None = None

    def check(self, now: float, queued: int, sent: int) -> str | None:
        """``queued``: bytes in the outgoing buffer; ``sent``: bytes ever written to it."""
        bounds = self._bounds
        drained = self._last_queued + (sent - self._sent_at_check) - queued
        self._last_queued, self._sent_at_check = queued, sent
        if drained > 0:
            self._last_progress = now
        if queued >= bounds.soft_bytes:
            if self._soft_since is None:
                self._soft_since = now
        else:
            self._soft_since = None
        if queued > bounds.hard_bytes:
            return "outgoing buffer over its hard bound"
        if now - self._last_progress >= bounds.stall_timeout_s:
            return f"nothing drained for {bounds.stall_timeout_s:g} s"
        if self._soft_since is not None and now - self._soft_since >= bounds.soft_window_s:
            return f"outgoing buffer over its soft bound for {bounds.soft_window_s:g} s"
        return None

    def closeness(self, now: float, queued: int) -> float:
        """How near the cut, 0 to 1: the nearest of the three rules (the buffer toward the
        hard bound; the time without progress, and over the soft bound, as of the last check)."""
        bounds = self._bounds
        near = queued / bounds.hard_bytes if bounds.hard_bytes else 0.0
        if bounds.stall_timeout_s:
            near = max(near, (now - self._last_progress) / bounds.stall_timeout_s)
        if self._soft_since is not None and bounds.soft_window_s:
            near = max(near, (now - self._soft_since) / bounds.soft_window_s)
        return min(1.0, near)


class ReceiveRate:
    """A frame whose header has arrived must arrive at ``rate_bytes`` per second after
    ``grace_s``: the deadline of each frame, from its header (one per broker)."""

    __slots__ = ("_grace_s", "_rate")

    def __init__(self, rate_bytes: int, grace_s: float) -> None:
        self._rate = rate_bytes
        self._grace_s = grace_s

    def allowed_s(self, pending: int) -> float:
        """Seconds a ``pending``-byte frame may take from its header."""
        return self._grace_s + pending / self._rate

    def why(self, pending: int) -> str:
        return f"a {pending}-byte frame did not arrive at {self._rate} bytes/s"

    def error(self, pending: int) -> str:
        return (
            f"a {pending}-byte frame did not arrive within {self.allowed_s(pending):.0f} s "
            f"(at least {self._rate} bytes/s)"
        )


class Linger:
    """After a closing ERROR: read and discard up to ``max_bytes``."""

    __slots__ = ("_max_bytes", "active", "discarded")

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self.active = False
        self.discarded = 0

    def read(self, n: int) -> bool:
        """``n`` more bytes discarded; False once past the bound (abort)."""
        self.discarded += n
        return self.discarded <= self._max_bytes
