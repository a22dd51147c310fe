"""Durable subscriptions: what a durable key may read is kept while it is away.

Stdlib only. ``config`` holds ``DurableConfig``; ``base`` the ``DurableLog``
interface (a JetStream-backed log can follow behind it); ``format`` the
segment file format; ``segments`` the local log (a segment log per channel,
a position per (key, channel), bounds, recovery); ``tcpack`` positions from
what the peer's TCP acknowledged. docs/durable.md says what each costs.
"""

from __future__ import annotations

from .base import BacklogReader, Chunk, DurableLog, KeyBacklog, LogStats
from .config import DurableConfig
from .segments import SegmentLog, SegmentReader

__all__ = [
    "BacklogReader",
    "Chunk",
    "DurableConfig",
    "DurableLog",
    "KeyBacklog",
    "LogStats",
    "SegmentLog",
    "SegmentReader",
]
