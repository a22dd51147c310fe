"""``DurableConfig``: where durable channel logs live and how far they may grow.

One frozen object, as ``config.BrokerConfig``; the broker's flags
(``--data-dir``, ``--durable-max-bytes``, ``--durable-max-age``,
``--durable-sync``, ``--durable-overlap``) fill it. Every bound has its unit in
its name and a default that a broker runs with unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB

# The broker's data directory: beside the default ./sqlite.db.
DEFAULT_DATA_DIR = "./hpfeeds-data"
# Linux's default tcp_rmem maximum (net.ipv4.tcp_rmem, third value): the most a
# collector's kernel may hold acknowledged but unread. Replay after an abortive
# close starts this far before the acknowledged point, so loss is not possible.
DEFAULT_OVERLAP_BYTES = 6 * MiB


@dataclass(frozen=True, slots=True)
class DurableConfig:
    # Directory of the log (``durable/`` under it) and of the broker's other state.
    data_dir: str = DEFAULT_DATA_DIR
    # Per durable key: the bytes kept for it over all its channels; past it the
    # oldest segment it still needs is dropped for that key (counted).
    max_bytes: int = 1 * GiB
    # A segment whose newest message is older than this is dropped for every key (counted).
    max_age_s: float = 24 * 3600.0
    # fsync the log and the positions at most this often (0: after every write);
    # a power loss costs at most this much of what was appended.
    sync_interval_s: float = 1.0
    # After a close that may have left acknowledged bytes unread (RST, timeout,
    # a close by the broker), replay starts this many bytes earlier.
    overlap_bytes: int = DEFAULT_OVERLAP_BYTES
    # Not flags: the unit of deletion (a segment file) and the most that waits
    # for the writer; past it appends are not stored (counted, the store degraded).
    segment_bytes: int = 16 * MiB
    max_pending_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ConfigError("durable data directory must not be empty")
        if self.max_bytes <= 0:
            raise ConfigError(f"durable max bytes must be positive, got {self.max_bytes}")
        if self.max_age_s <= 0:
            raise ConfigError(f"durable max age must be positive, got {self.max_age_s:g} s")
        if self.sync_interval_s < 0:
            raise ConfigError(f"durable sync interval must not be negative, got {self.sync_interval_s:g} s")
        if self.overlap_bytes < 0:
            raise ConfigError(f"durable overlap must not be negative, got {self.overlap_bytes}")
        if not 4096 <= self.segment_bytes <= self.max_bytes:
            raise ConfigError(
                f"durable segment size must be from 4096 bytes to max bytes ({self.max_bytes}),"
                f" got {self.segment_bytes}"
            )
        if self.max_pending_bytes <= 0:
            raise ConfigError(f"durable max pending bytes must be positive, got {self.max_pending_bytes}")
