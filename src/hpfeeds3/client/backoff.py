"""Exponential backoff with jitter for reconnecting."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based).

    The base delay doubles from ``initial_s`` up to ``max_s``; the actual delay
    is drawn uniformly from ``[base * (1 - jitter), base]`` so that many
    clients cut off by the same broker restart do not come back in lockstep.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s):
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        if self.factor < 1:
            raise ValueError("backoff factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be between 0 and 1")

    def base(self, attempt: int) -> float:
        # min() before the power would overflow for a large attempt number.
        if attempt > 64:
            return self.max_s
        return float(min(self.max_s, self.initial_s * self.factor**attempt))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = self.base(attempt)
        draw = (rng or random).random()
        return base * (1.0 - self.jitter * draw)
