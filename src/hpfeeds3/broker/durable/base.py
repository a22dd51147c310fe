"""The durable log's interface: what the broker asks of any backend.

The local segment log (``segments.SegmentLog``) implements it; a
JetStream-backed log can follow behind the same Protocol. Positions are
sequence numbers per channel: a message's place in the channel's log, and a
key's position is the sequence number of the next message it has not been
shown to have received.

Threads: every method is called from the broker's event loop and returns
without waiting for the disk (``open_reader``'s ``read`` excepted: it reads
a file, so call it from a worker thread when the disk may be slow);
``on_written`` is called from the backend's own thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Chunk:
    """Whole frames read from a log, in order: ``frames`` messages from ``first_seq`` to ``end_seq``.

    In ``pieces``, one after the other: a view of the reader's block, or the records the
    writer has just written, as they are (a connection writes them with one ``writelines``:
    not copied to join them)."""

    pieces: tuple[bytes | memoryview, ...]
    size: int  # bytes in all the pieces
    first_seq: int
    end_seq: int  # the position after these frames
    frames: int
    skipped: int  # messages before first_seq that the log no longer had (dropped or never stored)

    @property
    def data(self) -> bytes | memoryview:
        """The frames in one buffer (the pieces joined when there are several)."""
        pieces = self.pieces
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


@dataclass(frozen=True, slots=True)
class KeyBacklog:
    """One durable key's backlog over its channels."""

    messages: int  # not yet read (by position; messages never stored included)
    bytes: int  # whole segments from each position on: at most one segment per channel more than exact
    oldest_age_s: float  # age of the oldest segment it still needs (0 when none)
    dropped: int  # messages dropped for it by max bytes or max age, exactly, since the log was made


@dataclass(frozen=True, slots=True)
class LogStats:
    degraded: bool  # the last write failed (full disk, I/O error): appends are being lost
    last_error: str  # why, "" when never
    appended: int  # messages handed to append
    unstored: int  # messages that could not be stored (write errors, writer too far behind)
    disk_bytes: int  # bytes in segment files
    segments: int


class BacklogReader(Protocol):
    """Reads one channel's log from a position, a bounded chunk at a time."""

    @property
    def position(self) -> int:
        """The sequence number of the next message ``read`` returns."""
        ...

    def read(self, max_bytes: int) -> Chunk | None:
        """The next frames, at most ``max_bytes`` (or one frame when it alone is larger);
        ``None`` when everything written so far was read."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DurableLog(Protocol):
    # How many batches the writer has written so far: the event loop looks at it between
    # publishes (a new value: something more was written) without waiting for on_written.
    written_batches: int

    def wants(self, channel: bytes) -> bool:
        """Whether some durable key follows ``channel`` (a channel none follows costs nothing)."""
        ...

    def append(self, channel: bytes, data: bytes, frames: int) -> int:
        """Log ``frames`` whole PUBLISH frames received on ``channel``; returns the
        channel's position after them (the sequence numbers are ``end - frames``
        to ``end - 1``). Never blocks and never raises for a disk problem: a
        message that cannot be stored is counted (``stats().unstored``)."""
        ...

    def written(self, channel: bytes) -> int:
        """The position after the last message written to the log (survives a process kill)."""
        ...

    @property
    def appended_bytes(self) -> int:
        """Bytes appended so far, over every channel (the inflow a live feed keeps pace with)."""
        ...

    def follow(self, ident: str, channel: bytes) -> int:
        """Keep ``channel`` for ``ident`` from now on (its position: the end) unless
        it already has a position; returns the position."""
        ...

    def unfollow(self, ident: str, channel: bytes | None = None) -> None:
        """Forget ``ident``'s position on ``channel`` (``None``: on every channel)."""
        ...

    def position(self, ident: str, channel: bytes) -> int | None: ...

    def followed(self) -> list[bytes]:
        """The channels some durable key follows (kept in the log)."""
        ...

    def idents(self) -> list[str]:
        """The keys that have a position on some channel."""
        ...

    def commit(self, ident: str, channel: bytes, position: int) -> None:
        """Set ``ident``'s position (from TCP evidence; it may move back for an
        overlap), kept within what the log holds."""
        ...

    def open_reader(self, channel: bytes, start: int) -> BacklogReader: ...

    def backlog(self, ident: str) -> KeyBacklog: ...

    def stats(self) -> LogStats: ...

    def set_on_written(self, callback: Callable[[], None] | None) -> None:
        """Called (from the log's thread) after new messages were written, unless more
        were appended since: whoever appends looks at ``written_batches`` after its
        append, and the batch that writes the last append calls it."""
        ...

    def close(self) -> None:
        """Write what is pending, sync, save positions, stop."""
        ...
