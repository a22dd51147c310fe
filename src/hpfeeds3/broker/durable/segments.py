"""The local durable log: a segment log per channel, positions per (key, channel).

Each message is stored once, in its channel's log, whatever the number of
durable keys that follow the channel; a key's position is a sequence number
(``base.py``). Files (``DurableConfig.data_dir``/``durable``)::

    LOCK                 flock: one broker process per directory
    positions.json       positions and drop counts, replaced atomically
    channels/<name>/     one directory per channel (format.channel_dirname)
        CHANNEL          the channel's exact name
        <first seq>.seg  segments (format.py)

Threads: the event loop calls ``append`` (a sequence number, a queue append,
no I/O) and the rest of the interface; one writer thread writes the queued
runs as records (each record's runs joined into one buffer, one ``writev`` per
batch), rolls segments, and applies the bounds; at most every
``sync_interval_s`` it hands what it wrote to the syncer thread, which
fsyncs it (a sealed segment too, then closes it) and saves positions while
the writer goes on. State they share is under one lock, held for
bookkeeping only, never across I/O.

Bounds, applied by the writer at every sync tick:

- a segment is deleted whole when every position on its channel has passed it
  (checked at every roll too); its file is kept for reuse (below);
- a key whose backlog (whole segments from each of its positions) exceeds
  ``max_bytes`` loses its oldest needed segment: its position moves past it
  and the messages skipped are added to its drop count, exactly;
- a segment whose newest message is older than ``max_age_s`` is deleted for
  every key, each position behind it moved past it and counted the same way.

The records just written stay in memory (``RECENT_BYTES`` over every channel,
the oldest dropped first), added with the written position once the write
returned: a reader at the start of one is handed it instead of reading it back
from the file.

Segment files are reused: a deleted segment's file that no reader has open is
renamed to a spare (``<n>.free`` in its channel's directory; at most
``SPARE_SEGMENTS`` in the whole store) and the channel's next segment is that
file renamed back and overwritten from its start. Overwriting pages the
kernel already holds costs the writer about half the CPU of filling a new
file (no page or block allocation, no size change per write). Old records
past the new data are never read as new: sequence numbers only grow within a
channel, and recovery and readers stop at a record that goes back; a
sealed segment is cut to its written size.

A write error (full disk, I/O error) degrades the store: the records are not
stored (their sequence numbers stay unused; readers skip them and count
them), the error is kept for ``stats()``, and the next batch is tried again.
Nothing raises into the caller of ``append``.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..auth.jsonfile import fsync_directory, write_atomic
from ..config import ConfigError
from .base import Chunk, KeyBacklog, LogStats
from .config import DurableConfig
from .format import (
    CHANNEL_FILE,
    HEADER_BYTES,
    INDEX_EVERY_BYTES,
    RECORD_MAX_BYTES,
    RecordHeader,
    channel_dirname,
    check_record,
    decode_header,
    encode_header,
    first_header,
    frame_ends,
    scan_segment,
    segment_name,
    segment_seq,
    split_records,
)

log = logging.getLogger("hpfeeds3.broker.durable")

POSITIONS_FILE = "positions.json"
# Drops and write errors are logged at most this often (per key, and for the store).
LOG_EVERY_S = 60.0
# Bound applied and files checked at least this often even when sync_interval_s is shorter.
MAINTENANCE_EVERY_S = 1.0
# A reader holds this much of a segment in memory (or one record, when larger):
# a whole record of the largest size a run is merged into, header included.
READ_BLOCK_BYTES = RECORD_MAX_BYTES + HEADER_BYTES
# After a batch this large (publishers are busy) the writer pauses before it looks
# again, so that the next batch is several runs, not one: each batch wakes the
# writer and takes the interpreter's lock from the event loop twice (after the wake
# and the write, which release it; google-crc32c holds it for under 1 MiB). What waits meanwhile
# is queued, not written: a process kill loses at most that much more.
BUSY_BATCH_BYTES = 128 * 1024
BUSY_PAUSE_S = 0.003
# How long close() waits for the writer to write what is queued.
CLOSE_TIMEOUT_S = 30.0


# A record to write: (first seq, messages, [header, *payload parts], bytes in all).
_Record = tuple[int, int, list[bytes], int]
# A record written, kept in memory: (first seq, end seq, its frames, its segment, the
# file offset after it).
_Recent = tuple[int, int, bytes, "Segment", int]
# Buffers per writev: IOV_MAX on Linux, macOS and the BSDs.
IOV_MAX = 1024
# Deleted segment files kept for reuse, in the whole store (at the default segment
# size, 64 MiB of disk): enough for a channel whose readers keep up to write only
# into reused files, few enough that many channels cannot hold much disk this way.
SPARE_SEGMENTS = 4
SPARE_SUFFIX = ".free"
# Records just written, kept in memory (over every channel, oldest dropped first): a
# reader that has caught up is handed these bytes rather than read them back.
RECENT_BYTES = 2 * 1024 * 1024


def _record(first: int, count: int, time_ms: int, payload: list[bytes], length: int) -> _Record:
    # Joined: a copy costs the writer less than the kernel's per-buffer work on many
    # small ones (runs are often one message), and the checksum is one call (and
    # google-crc32c takes bytes only).
    data = payload[0] if len(payload) == 1 else b"".join(payload)
    return (first, count, [encode_header(first, count, time_ms, data), data], HEADER_BYTES + length)


@dataclass(slots=True)
class Segment:
    first_seq: int
    path: str
    size: int = 0  # valid bytes: readers read below this
    end_seq: int = 0  # the position after its last record
    first_time_ms: int = 0  # 0: empty
    last_time_ms: int = 0
    index: list[tuple[int, int]] = field(default_factory=list)  # sparse (first seq, offset)
    # Its records were written, or checked at recovery, by this process: a reader
    # need not check their CRC again (it reads below ``size``: whole records only).
    checked: bool = True
    readers: int = 0  # readers that hold it open (under the log's lock): not reused while > 0
    gone: bool = False  # deleted: a reader looking for it looks again


@dataclass(slots=True)
class _Channel:
    name: bytes
    directory: str
    segments: list[Segment] = field(default_factory=list)  # oldest first; the last is written to
    next_seq: int = 0  # assigned by append (event loop)
    written_seq: int = 0  # the position after the last record written (or given up)
    pending: deque[tuple[int, int, bytes]] = field(default_factory=deque)  # (first seq, frames, data)
    fd: int = -1  # the last segment, open for appending (writer thread)
    file_bytes: int = 0  # the size of its file when opened (a reused file is larger than its data)
    spares: list[str] = field(default_factory=list)  # reusable files in its directory (writer thread)
    sealed: bool = False  # the last segment takes no more records: the next write starts one
    recent: deque[_Recent] = field(default_factory=deque)  # written records in memory (under the lock)
    dirty: bool = False  # written since the last fsync
    next_index: int = INDEX_EVERY_BYTES


class SegmentLog:
    """``DurableLog`` on local files. Build it with ``SegmentLog.open(config)``."""

    def __init__(self, config: DurableConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.root = os.path.join(config.data_dir, "durable")
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # The writer waits for work (``_wake``) only when it found none: an append
        # while it writes need not wake it (an Event.set is a lock and a futex call,
        # and under load the writer is always busy). Runs queued and taken, counted on
        # each side, tell it whether any came in since it last looked.
        self._writer_idle = False
        self._runs_queued = 0  # event loop
        self._runs_taken = 0  # writer
        self._stopping = False
        self._channels: dict[bytes, _Channel] = {}
        self._positions: dict[tuple[str, bytes], int] = {}
        self._followers: dict[bytes, int] = {}  # channel -> number of positions on it
        self._dropped: dict[str, int] = {}
        self._dropped_unlogged: dict[str, int] = {}
        self._positions_changed = False
        self._on_written: Callable[[], None] | None = None
        # Batches written so far (writer): the loop compares it with what it saw last to
        # feed durable connections within its turn, not only when on_written reaches it.
        self.written_batches = 0
        self._new_follow = False  # a key follows a channel it had no position on: save before writing
        self._lock_fd = -1
        self._thread: threading.Thread | None = None
        # counters: each written by one thread only
        self._appended = 0  # event loop
        self._queued_bytes = 0  # event loop
        self._overflow = 0  # event loop: not queued, the writer being too far behind
        self._overflow_logged = 0  # writer: what of _overflow the log has said
        self._overflow_logged_at = -LOG_EVERY_S  # writer
        self._done_bytes = 0  # writer
        self._unstored = 0  # writer
        self._degraded = False
        self._last_error = ""
        self._last_error_logged = 0.0
        self._dirs_dirty: set[str] = set()
        self._sealed_fds: list[int] = []  # writer: segments sealed since the last sync, open until it
        # The syncer thread: fsyncs what the writer hands it at each sync tick.
        self._to_sync: list[int] = []  # descriptors it fsyncs and closes (under _lock)
        self._dirs_to_sync: set[str] = set()  # (under _lock)
        self._sync_wake = threading.Event()
        self._sync_mutex = threading.Lock()  # one sync job at a time
        self._save_mutex = threading.Lock()  # one positions file written at a time
        self._syncer_stopping = False
        self._syncer: threading.Thread | None = None
        self._maintenance_wanted = False
        # Records written, in write order over every channel (under _lock): each channel's
        # ``recent`` holds its own, and what passes RECENT_BYTES goes, oldest first.
        self._recent: deque[_Channel] = deque()
        self._recent_bytes = 0
        self._maintenance_runs = 0  # writer
        self._spares = 0  # writer: spare segment files kept, over every channel
        self.reused_segments = 0  # writer: segments written into a reused file

    # --- opening and closing --------------------------------------------------------

    @classmethod
    def open(cls, config: DurableConfig, *, clock: Callable[[], float] = time.time) -> SegmentLog:
        """Recover the log in ``config.data_dir`` (made when missing) and start its writer.

        Blocking (it reads the last segment of each channel); ``ConfigError``
        when the directory cannot be used or another process holds it."""
        self = cls(config, clock=clock)
        try:
            os.makedirs(os.path.join(self.root, "channels"), exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.root, "LOCK"), os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as e:
            raise ConfigError(f"durable data directory {self.root!r}: {e.strerror or e}") from e
        try:
            import fcntl

            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError as e:
            os.close(self._lock_fd)
            raise ConfigError(f"durable data directory {self.root!r} is in use by another process") from e
        try:
            self._recover()
        except OSError as e:
            os.close(self._lock_fd)
            raise ConfigError(f"durable data directory {self.root!r}: {e.strerror or e}") from e
        self._thread = threading.Thread(target=self._run_writer, name="hpfeeds-durable-writer", daemon=True)
        self._thread.start()
        self._syncer = threading.Thread(target=self._run_syncer, name="hpfeeds-durable-syncer", daemon=True)
        self._syncer.start()
        return self

    def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(CLOSE_TIMEOUT_S)
        if thread.is_alive():
            log.error("durable log: the writer did not finish within %g s; closing anyway", CLOSE_TIMEOUT_S)
        self._thread = None
        syncer = self._syncer
        if syncer is not None:
            self._syncer_stopping = True
            self._sync_wake.set()
            syncer.join(CLOSE_TIMEOUT_S)
            self._syncer = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _recover(self) -> None:
        channels_dir = os.path.join(self.root, "channels")
        for entry in sorted(os.listdir(channels_dir)):
            directory = os.path.join(channels_dir, entry)
            try:
                with open(os.path.join(directory, CHANNEL_FILE), "rb") as f:
                    name = f.read()
            except OSError:
                log.warning("durable log: %s has no %s file; ignored", directory, CHANNEL_FILE)
                continue
            self._channels[name] = self._recover_channel(name, directory)
        self._load_positions()

    def _recover_channel(self, name: bytes, directory: str) -> _Channel:
        channel = _Channel(name, directory)
        files = os.listdir(directory)
        for spare in sorted(f for f in files if f.endswith(SPARE_SUFFIX)):
            path = os.path.join(directory, spare)
            if self._spares < SPARE_SEGMENTS:
                channel.spares.append(path)
                self._spares += 1
            else:
                os.unlink(path)
        found = sorted((seq, f) for f in files if (seq := segment_seq(f)) is not None)
        for i, (seq, filename) in enumerate(found):
            path = os.path.join(directory, filename)
            if i + 1 < len(found):
                # Sealed: trusted; its newest time is bounded by the next one's oldest.
                head = first_header(path)
                later = first_header(os.path.join(directory, found[i + 1][1]))
                first_time = head.time_ms if head else 0
                segment = Segment(
                    seq,
                    path,
                    size=os.path.getsize(path),
                    end_seq=found[i + 1][0],
                    first_time_ms=first_time,
                    last_time_ms=later.time_ms if later else first_time,
                    index=[(seq, 0)],
                    checked=False,
                )
            else:
                scan = scan_segment(path, seq)
                if scan.torn_bytes:
                    # A crash mid-write, or the rest of a reused file not yet overwritten.
                    log.warning(
                        "durable log: %s: %d bytes after the last whole record (a crash mid-write"
                        " or old data of a reused file); cut",
                        path,
                        scan.torn_bytes,
                    )
                    with open(path, "r+b") as f:
                        f.truncate(scan.valid_bytes)
                        os.fsync(f.fileno())
                segment = Segment(
                    seq, path, scan.valid_bytes, scan.end_seq, scan.first_time_ms, scan.last_time_ms, scan.index
                )
            channel.segments.append(segment)
        if channel.segments:
            channel.next_seq = channel.written_seq = channel.segments[-1].end_seq
        return channel

    def _load_positions(self) -> None:
        path = os.path.join(self.root, POSITIONS_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("durable log: cannot read %s (%s); every key starts from the end", path, e)
            return
        try:
            entries = [
                (str(ident), bytes.fromhex(channel_hex), int(seq)) for ident, channel_hex, seq in doc["positions"]
            ]
            dropped = {str(k): int(v) for k, v in doc["dropped"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.error("durable log: %s is not a positions file (%r); every key starts from the end", path, e)
            return
        for ident, name, seq in entries:
            channel = self._channel(name)
            low = channel.segments[0].first_seq if channel.segments else channel.written_seq
            # A position ahead of what was written (saved after a crash lost the tail) is the end.
            self._positions[(ident, name)] = min(max(seq, low), channel.written_seq)
            self._followers[name] = self._followers.get(name, 0) + 1
        self._dropped = dropped

    def _channel(self, name: bytes) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = _Channel(name, os.path.join(self.root, "channels", channel_dirname(name)))
            with self._lock:
                self._channels[name] = channel
        return channel

    # --- the event loop's side ------------------------------------------------------

    def wants(self, channel: bytes) -> bool:
        return channel in self._followers

    def append(self, channel: bytes, data: bytes, frames: int) -> int:
        ch = self._channels.get(channel) or self._channel(channel)
        first = ch.next_seq
        ch.next_seq = end = first + frames
        self._appended += frames
        if self._queued_bytes - self._done_bytes + len(data) > self.config.max_pending_bytes or self._stopping:
            self._overflow += frames  # the writer is far behind (a stalled disk): not stored
            ch.pending.append((first, frames, b""))
        else:
            self._queued_bytes += len(data)
            ch.pending.append((first, frames, data))
        self._runs_queued += 1
        if self._writer_idle and not self._wake.is_set():
            self._wake.set()
        return end

    @property
    def appended_bytes(self) -> int:
        return self._queued_bytes

    def written(self, channel: bytes) -> int:
        ch = self._channels.get(channel)
        return 0 if ch is None else ch.written_seq

    def follow(self, ident: str, channel: bytes) -> int:
        ch = self._channel(channel)
        with self._lock:
            at = self._positions.get((ident, channel))
            if at is None:
                at = self._positions[(ident, channel)] = ch.next_seq
                self._followers[channel] = self._followers.get(channel, 0) + 1
                self._positions_changed = True
                self._new_follow = True
        return at

    def unfollow(self, ident: str, channel: bytes | None = None) -> None:
        with self._lock:
            for key in [k for k in self._positions if k[0] == ident and (channel is None or k[1] == channel)]:
                del self._positions[key]
                left = self._followers[key[1]] - 1
                if left:
                    self._followers[key[1]] = left
                else:
                    del self._followers[key[1]]
                self._positions_changed = True

    def position(self, ident: str, channel: bytes) -> int | None:
        return self._positions.get((ident, channel))

    def followed(self) -> list[bytes]:
        with self._lock:
            return list(self._followers)

    def idents(self) -> list[str]:
        with self._lock:
            return sorted({ident for ident, _ in self._positions})

    def commit(self, ident: str, channel: bytes, position: int) -> None:
        ch = self._channels.get(channel)
        with self._lock:
            if ch is None or (ident, channel) not in self._positions:
                return
            low = ch.segments[0].first_seq if ch.segments else ch.written_seq
            new = min(max(position, low), ch.next_seq)
            if self._positions[(ident, channel)] != new:
                self._positions[(ident, channel)] = new
                self._positions_changed = True

    def open_reader(self, channel: bytes, start: int) -> SegmentReader:
        return SegmentReader(self, self._channel(channel), start)

    def backlog(self, ident: str) -> KeyBacklog:
        now_ms = self._clock() * 1000
        messages = size = 0
        oldest_ms = 0
        with self._lock:
            for (who, name), at in self._positions.items():
                if who != ident:
                    continue
                ch = self._channels[name]
                messages += ch.next_seq - at
                needed = _needed(ch.segments, at)
                size += sum(s.size for s in needed)
                if needed and needed[0].first_time_ms and at < ch.written_seq:
                    first = needed[0].first_time_ms
                    oldest_ms = first if not oldest_ms else min(oldest_ms, first)
            dropped = self._dropped.get(ident, 0)
        age = max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms else 0.0
        return KeyBacklog(messages=messages, bytes=size, oldest_age_s=age, dropped=dropped)

    def stats(self) -> LogStats:
        with self._lock:
            segments = [s for ch in self._channels.values() for s in ch.segments]
        return LogStats(
            degraded=self._degraded,
            last_error=self._last_error,
            appended=self._appended,
            unstored=self._unstored + self._overflow,
            disk_bytes=sum(s.size for s in segments),
            segments=len(segments),
        )

    def set_on_written(self, callback: Callable[[], None] | None) -> None:
        self._on_written = callback

    def maintain(self, timeout_s: float = 10.0) -> bool:
        """Apply the bounds now and wait (blocking) until done, rather than at the next tick."""
        runs = self._maintenance_runs
        self._maintenance_wanted = True
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        while self._maintenance_runs == runs:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def sync(self, timeout_s: float = 10.0) -> bool:
        """Wait (blocking) until what was appended before the call is written; for tests and shutdown."""
        targets = {name: ch.next_seq for name, ch in list(self._channels.items())}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._channels[name].written_seq >= seq for name, seq in targets.items()):
                return True
            self._wake.set()
            time.sleep(0.001)
        return False

    # --- the writer thread ------------------------------------------------------------

    def _run_writer(self) -> None:
        last_sync = last_maintenance = time.monotonic()
        interval = self.config.sync_interval_s
        while True:
            self._writer_idle = True
            # Looked at after saying so: an append either sees the writer idle (and wakes
            # it) or came before, and then its run is counted here.
            if self._runs_queued == self._runs_taken:
                self._wake.wait(min(MAINTENANCE_EVERY_S, interval) if interval > 0 else MAINTENANCE_EVERY_S)
            self._writer_idle = False
            self._wake.clear()
            stopping = self._stopping
            try:
                if self._new_follow:
                    # A new position is saved before the messages appended after it are
                    # written: a message that reached the file has its follower on disk.
                    self._new_follow = False
                    self._save_positions()
                taken = self._done_bytes
                wrote = self._write_pending()
                taken = self._done_bytes - taken
                now = time.monotonic()
                self._log_overflow(now)
                if stopping or now - last_sync >= interval:
                    self._hand_to_syncer()
                    if stopping:
                        self._sync_job()  # everything on disk before close() returns
                    else:
                        self._sync_wake.set()
                    last_sync = now
                if stopping or self._maintenance_wanted or now - last_maintenance >= MAINTENANCE_EVERY_S:
                    self._maintenance_wanted = False
                    self._maintain()
                    last_maintenance = now
                    self._maintenance_runs += 1
            except Exception:  # a bug must not stop the writer: the broker would log nothing more
                log.exception("durable log: internal error in the writer")
                wrote = False
            if wrote:
                self.written_batches += 1
            callback = self._on_written
            # A run queued since this batch was taken: its append looked at (or will look
            # at, as the router does after each append) written_batches, and its own batch
            # follows; so while appends keep coming the loop is not also woken from here
            # (a wake-up of the loop per batch) and the batch after the last append is.
            # (Counted after written_batches: an append either came before, and is seen
            # here, or sees the new count.)
            if wrote and callback is not None and self._runs_queued == self._runs_taken:
                try:
                    callback()
                except Exception:
                    log.exception("durable log: internal error in the on_written callback")
            if stopping and not any(ch.pending for ch in list(self._channels.values())):
                self._close_files()
                return
            if taken >= BUSY_BATCH_BYTES and not self._stopping:
                time.sleep(BUSY_PAUSE_S)

    def _write_pending(self) -> bool:
        wrote = False
        for ch in list(self._channels.values()):
            if ch.pending:
                self._write_channel(ch)
                wrote = True
        return wrote

    def _write_channel(self, ch: _Channel) -> None:
        """Write the channel's queued runs as records, rolling segments at ``segment_bytes``.

        Consecutive runs are merged into records of up to RECORD_MAX_BYTES (an eighth
        of a segment at most): one header and one checksum per record, not per run
        (runs of one message are common). A record is its header and its runs joined
        into one buffer, written with ``writev`` in batches; only a run larger than a
        record is cut (at frame boundaries)."""
        now_ms = int(self._clock() * 1000)
        limit = min(RECORD_MAX_BYTES, self.config.segment_bytes // 8)
        records: list[_Record] = []
        given_up = 0
        parts: list[bytes] = []
        first = end = size = 0
        pending = ch.pending
        while pending:
            run_first, frames, data = pending.popleft()
            self._runs_taken += 1
            if not data:
                given_up = run_first + frames  # not queued (counted as overflow by append)
                continue
            n = len(data)
            self._done_bytes += n
            if parts and (run_first != end or size + n > limit):
                records.append(_record(first, end - first, now_ms, parts, size))
                parts = []
            if n > limit:
                for payload, count in split_records(data, frames, limit):
                    records.append(_record(run_first, count, now_ms, [payload], len(payload)))
                    run_first += count
                continue
            if not parts:
                first, size = run_first, 0
            parts.append(data)
            end = run_first + frames
            size += n
        if parts:
            records.append(_record(first, end - first, now_ms, parts, size))
        batch: list[_Record] = []
        batch_bytes = 0
        index: list[tuple[int, int]] = []
        for record in records:
            first, count, _parts, nbytes = record
            segment = self._active(ch, first)
            if (
                segment is not None
                and segment.size + batch_bytes
                and (segment.size + batch_bytes + nbytes > self.config.segment_bytes)
            ):
                if batch:
                    self._flush(ch, batch, batch_bytes, index, now_ms)
                    batch, batch_bytes, index = [], 0, []
                self._seal(ch)
                self._delete_passed(ch)  # the new segment may reuse a passed one's file
                segment = self._active(ch, first)
            if segment is None:  # no segment could be opened: not stored
                self._unstored += count
                with self._lock:
                    ch.written_seq = max(ch.written_seq, first + count)
                continue
            at = segment.size + batch_bytes
            if at >= ch.next_index:
                index.append((first, at))
                ch.next_index = at + INDEX_EVERY_BYTES
            batch.append(record)
            batch_bytes += nbytes
        if batch:
            self._flush(ch, batch, batch_bytes, index, now_ms)
        if given_up > ch.written_seq:
            with self._lock:
                ch.written_seq = given_up

    def _active(self, ch: _Channel, first_seq: int) -> Segment | None:
        """The segment being written, opened (or made, starting at ``first_seq``) when none is."""
        if ch.fd >= 0:
            return ch.segments[-1]
        try:
            self._open_active(ch, first_seq)
        except OSError as e:
            self._failed(f"cannot open a segment in {ch.directory}: {e.strerror or e}")
            return None
        return ch.segments[-1]

    def _open_active(self, ch: _Channel, first_seq: int) -> None:
        if not os.path.isdir(ch.directory):
            os.makedirs(ch.directory, exist_ok=True)
            self._dirs_dirty.add(os.path.dirname(ch.directory))
        name_file = os.path.join(ch.directory, CHANNEL_FILE)
        if not os.path.exists(name_file):
            tmp = name_file + ".tmp"
            with open(tmp, "wb") as f:
                f.write(ch.name)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name_file)
            self._dirs_dirty.add(ch.directory)
        # Not O_APPEND: a reused file is written from its start, over its old data.
        if ch.segments and not ch.sealed:
            segment = ch.segments[-1]  # recovered (cut to its whole records): go on appending to it
            ch.fd = os.open(segment.path, os.O_WRONLY)
            os.lseek(ch.fd, segment.size, os.SEEK_SET)
            ch.file_bytes = segment.size
        else:
            path = os.path.join(ch.directory, segment_name(first_seq))
            ch.fd, ch.file_bytes = self._new_file(ch, path)
            segment = Segment(first_seq, path, end_seq=first_seq, index=[(first_seq, 0)])
            with self._lock:
                ch.segments.append(segment)
            ch.sealed = False
            self._dirs_dirty.add(ch.directory)
        ch.next_index = segment.index[-1][1] + INDEX_EVERY_BYTES

    def _new_file(self, ch: _Channel, path: str) -> tuple[int, int]:
        """A segment file at ``path``, open for writing from its start: a spare renamed
        when the channel has one, else a new file. Returns the descriptor and its size."""
        while ch.spares:
            spare = ch.spares.pop()
            self._spares -= 1
            try:
                os.rename(spare, path)
                fd = os.open(path, os.O_WRONLY)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(spare)
                continue
            self.reused_segments += 1
            return fd, os.fstat(fd).st_size
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 0

    def _cut_reused(self, ch: _Channel) -> None:
        """Cut a reused file to the segment's data (its old data after it is never read)."""
        segment = ch.segments[-1]
        if ch.file_bytes > segment.size:
            try:
                os.ftruncate(ch.fd, segment.size)
                ch.file_bytes = segment.size
                ch.dirty = True
            except OSError as e:
                self._failed(f"cannot cut {segment.path}: {e.strerror or e}")

    def _seal(self, ch: _Channel) -> None:
        """Stop writing the segment being written; the next write starts a new one. Written
        since the last sync, it is synced (and closed) at the next sync with the others: a
        roll does not wait for the disk."""
        if ch.fd >= 0:
            self._cut_reused(ch)
            if ch.dirty:
                self._sealed_fds.append(ch.fd)
            else:
                os.close(ch.fd)
            ch.fd = -1
            ch.dirty = False
        ch.sealed = True

    def _flush(
        self, ch: _Channel, batch: list[_Record], nbytes: int, index: list[tuple[int, int]], now_ms: int
    ) -> None:
        """Whole records to the segment being written (``writev``, no copy); on failure,
        cut back to before them."""
        segment = ch.segments[-1]
        last = batch[-1]
        end = last[0] + last[1]
        iov = [part for record in batch for part in record[2]]
        done = 0
        try:
            for i in range(0, len(iov), IOV_MAX):
                group = iov[i : i + IOV_MAX]
                wrote = os.writev(ch.fd, group)
                done += wrote
                want = nbytes if len(group) == len(iov) else sum(map(len, group))
                if wrote < want:  # a short write (a regular file: seldom): the rest, joined
                    rest = memoryview(b"".join(group))[wrote:]
                    while rest:
                        wrote = os.write(ch.fd, rest)
                        done += wrote
                        rest = rest[wrote:]
        except OSError as e:
            self._unstored += sum(record[1] for record in batch)
            if done:
                try:
                    os.ftruncate(ch.fd, segment.size)
                    os.lseek(ch.fd, segment.size, os.SEEK_SET)
                    ch.file_bytes = min(ch.file_bytes, segment.size)
                except OSError:
                    # The segment now ends in part of a record: readers stop there and
                    # go on with the next segment, which the next write starts.
                    self._seal(ch)
            self._failed(f"cannot write {segment.path}: {e.strerror or e}")
            with self._lock:
                ch.written_seq = max(ch.written_seq, end)
            return
        with self._lock:
            if not segment.size:
                segment.first_time_ms = now_ms
            at = segment.size
            segment.size += nbytes
            segment.end_seq = end
            segment.last_time_ms = now_ms
            segment.index.extend(index)
            ch.written_seq = end
            # In the file now (the page cache: safe from a process kill): readers that
            # have caught up may be handed these bytes.
            recent, everywhere = ch.recent, self._recent
            for first, count, parts, size in batch:
                at += size
                recent.append((first, first + count, parts[1], segment, at))
                everywhere.append(ch)
                self._recent_bytes += size
            while self._recent_bytes > RECENT_BYTES:
                oldest = everywhere.popleft().recent.popleft()
                self._recent_bytes -= len(oldest[2]) + HEADER_BYTES
        ch.dirty = True
        if self._degraded:
            log.warning("durable log: writing again after: %s", self._last_error)
            self._degraded = False
        if self.config.sync_interval_s == 0:
            try:
                os.fsync(ch.fd)
                ch.dirty = False
            except OSError as e:
                self._failed(f"cannot sync {segment.path}: {e.strerror or e}")

    def _failed(self, why: str) -> None:
        self._degraded = True
        self._last_error = why
        now = time.monotonic()
        if now - self._last_error_logged >= LOG_EVERY_S:
            self._last_error_logged = now
            log.error("durable log: %s; messages are not being stored (%d so far)", why, self._unstored)

    def _hand_to_syncer(self) -> None:
        """(Writer) What was written since the last sync goes to the syncer: the segments
        sealed since, a duplicate of each written one's descriptor, the directories changed.
        The writer goes on writing while the disk syncs."""
        fds, self._sealed_fds = self._sealed_fds, []
        for ch in list(self._channels.values()):
            if ch.dirty and ch.fd >= 0:
                try:
                    fds.append(os.dup(ch.fd))
                except OSError:  # no descriptor left: sync it here
                    self._sync_fd(ch.fd, ch.directory)
                ch.dirty = False
        dirs, self._dirs_dirty = self._dirs_dirty, set()
        with self._lock:
            self._to_sync.extend(fds)
            self._dirs_to_sync |= dirs

    def _run_syncer(self) -> None:
        while not self._syncer_stopping:
            self._sync_wake.wait()
            self._sync_wake.clear()
            try:
                self._sync_job()
            except Exception:
                log.exception("durable log: internal error in the syncer")

    def _sync_job(self) -> None:
        """fsync (and close) what the writer handed over, the directories, then save the positions."""
        with self._sync_mutex:
            with self._lock:
                fds, self._to_sync = self._to_sync, []
                dirs, self._dirs_to_sync = self._dirs_to_sync, set()
            for fd in fds:
                try:
                    self._sync_fd(fd, "a segment")
                finally:
                    os.close(fd)
            for directory in dirs:
                fsync_directory(directory)
            self._save_positions()

    def _sync_fd(self, fd: int, what: str) -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            self._failed(f"cannot sync {what}: {e.strerror or e}")

    def _save_positions(self) -> None:
        with self._save_mutex:  # the writer (a new follower) and the syncer
            self._save_positions_now()

    def _save_positions_now(self) -> None:
        with self._lock:
            if not self._positions_changed:
                return
            doc = {
                "version": 1,
                "positions": [[ident, name.hex(), seq] for (ident, name), seq in sorted(self._positions.items())],
                "dropped": dict(sorted(self._dropped.items())),
            }
            self._positions_changed = False
        try:
            write_atomic(os.path.join(self.root, POSITIONS_FILE), json.dumps(doc) + "\n", mode=0o600)
        except OSError as e:
            with self._lock:
                self._positions_changed = True
            self._failed(f"cannot save positions: {e.strerror or e}")

    def _close_files(self) -> None:
        for fd in self._sealed_fds:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        self._sealed_fds = []
        for ch in list(self._channels.values()):
            if ch.fd >= 0:
                self._cut_reused(ch)
                with contextlib.suppress(OSError):
                    os.fsync(ch.fd)
                os.close(ch.fd)
                ch.fd = -1

    # --- bounds (writer thread) -------------------------------------------------------

    def _maintain(self) -> None:
        now_ms = int(self._clock() * 1000)
        cutoff_ms = now_ms - int(self.config.max_age_s * 1000)
        for ch in list(self._channels.values()):
            self._expire(ch, cutoff_ms)
        self._enforce_max_bytes()
        for ch in list(self._channels.values()):
            self._delete_passed(ch)
        self._log_drops()

    def _expire(self, ch: _Channel, cutoff_ms: int) -> None:
        """Drop, for every key, the segments whose newest message is older than max age."""
        while ch.segments and ch.segments[0].size and ch.segments[0].last_time_ms < cutoff_ms:
            if len(ch.segments) == 1:
                # the last segment expired whole: seal it and start an empty one
                self._seal(ch)
                if self._active(ch, ch.written_seq) is None:
                    return
            with self._lock:
                self._drop_for(ch, None, ch.segments[1].first_seq)
            self._delete_first(ch)

    def _drop_for(self, ch: _Channel, ident: str | None, new_low: int) -> None:
        """Under the lock: move ``ident``'s (``None``: every) position on ``ch`` up to ``new_low``, counting."""
        for (who, name), at in list(self._positions.items()):
            if name != ch.name or at >= new_low or (ident is not None and who != ident):
                continue
            self._positions[(who, name)] = new_low
            self._dropped[who] = self._dropped.get(who, 0) + (new_low - at)
            self._dropped_unlogged[who] = self._dropped_unlogged.get(who, 0) + (new_low - at)
            self._positions_changed = True

    def _enforce_max_bytes(self) -> None:
        limit = self.config.max_bytes
        with self._lock:
            idents = {ident for ident, _ in self._positions}
        for ident in idents:
            while True:
                with self._lock:
                    mine = [(self._channels[name], at) for (who, name), at in self._positions.items() if who == ident]
                    total = sum(s.size for ch, at in mine for s in _needed(ch.segments, at))
                    if total <= limit:
                        break
                    # the oldest segment it needs that is sealed (a later one exists)
                    candidates = []
                    for ch, at in mine:
                        needed = _needed(ch.segments, at)
                        if len(needed) > 1:
                            candidates.append((needed[0].first_time_ms, needed[1].first_seq, ch))
                    if not candidates:
                        break  # only the segments being written: within one segment per channel
                    _, new_low, ch = min(candidates, key=lambda c: c[0])
                    self._drop_for(ch, ident, new_low)

    def _delete_passed(self, ch: _Channel) -> None:
        """Delete sealed segments that every position on the channel has passed."""
        while len(ch.segments) > 1:
            with self._lock:
                low = min((at for (_, name), at in self._positions.items() if name == ch.name), default=None)
            if low is not None and low < ch.segments[1].first_seq:
                return
            self._delete_first(ch)

    def _delete_first(self, ch: _Channel) -> None:
        """Delete the channel's oldest segment: its file is kept as a spare when no reader
        has it open (a reader that has keeps reading the old data) and the store has room."""
        with self._lock:
            segment = ch.segments.pop(0)
            segment.gone = True
            reusable = segment.readers == 0 and self._spares < SPARE_SEGMENTS
        try:
            if reusable:
                spare = os.path.join(ch.directory, f"{segment.first_seq:020d}{SPARE_SUFFIX}")
                os.rename(segment.path, spare)
                ch.spares.append(spare)
                self._spares += 1
            else:
                os.unlink(segment.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._failed(f"cannot delete {segment.path}: {e.strerror or e}")
        self._dirs_dirty.add(ch.directory)

    def _log_overflow(self, now: float) -> None:
        """Say (at most once a minute) that messages were not stored because the writer
        was more than ``max_pending_bytes`` behind: counted in ``unstored`` too."""
        overflow = self._overflow
        if overflow == self._overflow_logged or now - self._overflow_logged_at < LOG_EVERY_S:
            return
        log.warning(
            "durable log: %d messages not stored: the writer was more than %d bytes behind the publishers (%d so far)",
            overflow - self._overflow_logged,
            self.config.max_pending_bytes,
            overflow,
        )
        self._overflow_logged, self._overflow_logged_at = overflow, now

    def _log_drops(self) -> None:
        if not self._dropped_unlogged:
            return
        now = time.monotonic()
        if now - getattr(self, "_drops_logged", 0.0) < LOG_EVERY_S:
            return
        self._drops_logged = now
        with self._lock:
            unlogged, self._dropped_unlogged = self._dropped_unlogged, {}
        for ident, count in sorted(unlogged.items()):
            log.warning(
                "durable log: dropped %d messages for %s (max bytes %d or max age %g s reached)",
                count,
                ident,
                self.config.max_bytes,
                self.config.max_age_s,
            )


def _needed(segments: list[Segment], position: int) -> list[Segment]:
    """The segments holding ``position`` and after (what a key at ``position`` still needs)."""
    if not segments:
        return []
    starts = [s.first_seq for s in segments]
    i = max(0, bisect.bisect_right(starts, position) - 1)
    return segments[i:]


class SegmentReader:
    """Reads a channel's log from ``start`` in blocks: at most ``READ_BLOCK_BYTES``
    (or one record, when larger) of the file in memory at a time."""

    def __init__(self, log_: SegmentLog, channel: _Channel, start: int) -> None:
        self._log = log_
        self._channel = channel
        self._position = start  # the next message read returns
        self.skipped = 0  # messages passed over since the start (dropped, or never stored)
        self._unreported = 0  # ... not yet reported in a Chunk
        self._segment: Segment | None = None
        self._fd = -1
        self._offset = 0  # file offset of the next record
        self._buffer = memoryview(b"")
        self._buffer_at = 0  # file offset of _buffer[0]
        self._payload = memoryview(b"")  # the current record's frames, from _at
        self._at = 0
        self._payload_seq = 0  # sequence number of the frame at _at
        self._payload_end = 0  # the position after the record's last frame

    @property
    def position(self) -> int:
        return self._position

    def close(self) -> None:
        self._leave()
        self._buffer = self._payload = memoryview(b"")

    def _leave(self) -> None:
        """Close the segment file open, if any: the writer may reuse it once no reader has it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        segment, self._segment = self._segment, None
        if segment is not None:
            with self._log._lock:
                segment.readers -= 1

    def read(self, max_bytes: int) -> Chunk | None:
        if self._at >= len(self._payload):  # between records: the next may be in memory
            chunk = self._read_recent(max_bytes)
            if chunk is not None:
                return chunk
        parts: list[memoryview] = []
        size = frames = skipped = 0
        first = self._position
        while True:
            if self._at >= len(self._payload):
                before = self._position
                if not self._next_record():
                    break  # (numbers given up at the tail are reported with a later chunk)
                gap = self._payload_seq - self._position
                if gap > 0:
                    self._skip(gap)
                if self._position != before and frames:
                    break  # a chunk is contiguous: the gap (counted) starts the next one
            start = self._at
            if not frames:
                first = self._position
            full = False
            if size + len(self._payload) - start <= max_bytes:
                # the rest of the record fits: no need to walk its frames
                self._at = len(self._payload)
                left = self._payload_end - self._payload_seq
                frames += left
                self._position += left
                self._payload_seq += left
            if self._at == start:
                if frames:
                    break  # the record's rest does not fit: it starts the next chunk, unwalked
                for end in frame_ends(self._payload, start):
                    if frames and size + (end - start) > max_bytes:
                        full = True
                        break
                    self._at = end
                    frames += 1
                    self._position += 1
                    self._payload_seq += 1
            if self._at > start:
                if not parts:  # what was passed over before this chunk's first message
                    skipped, self._unreported = self._unreported, 0
                parts.append(self._payload[start : self._at])
                size += self._at - start
                end_seq = self._position
            if full:
                break
        if not frames:
            return None
        # Views of the reader's block, not copies: the block is never written to again
        # (the next read makes a new one).
        return Chunk(tuple(parts), size, first, end_seq, frames, skipped)

    def _read_recent(self, max_bytes: int) -> Chunk | None:
        """The records from the position on that the writer has just written and keeps in
        memory (``SegmentLog._recent``), whole, up to ``max_bytes``: what a reader that
        keeps up reads, without reading it back from the file. None when the position is
        not at the start of one of them."""
        position = self._position
        taken: list[bytes] = []
        size = 0
        with self._log._lock:
            recent = self._channel.recent
            if not recent or recent[-1][1] <= position or recent[0][0] > position:
                return None
            last = None
            for entry in recent:
                first, end, data, _segment, _offset = entry
                if end <= position:
                    continue
                if first != position or (taken and size + len(data) > max_bytes):
                    break
                if not taken and len(data) > max_bytes and end - first > 1:
                    return None  # larger than a chunk: its frames are walked (from the file)
                taken.append(data)
                size += len(data)
                position = end
                last = entry
        if last is None:
            return None
        first, end, _data, segment, offset = last
        if self._segment is segment:
            self._offset = offset
        else:
            self._leave()  # the next read from the file opens the segment at the position
        self._payload, self._at = memoryview(b""), 0
        start = self._position
        self._position = end
        skipped, self._unreported = self._unreported, 0
        return Chunk(tuple(taken), size, start, end, end - start, skipped)

    def _skip(self, count: int) -> None:
        self._position += count
        self.skipped += count
        self._unreported += count

    def _next_record(self) -> bool:
        """Load the next record holding messages at or after the position; ``False``: all written was read."""
        while True:
            segment = self._segment
            if segment is None and not self._open_for_position():
                return False
            segment = self._segment
            assert segment is not None
            with self._log._lock:
                size = segment.size
                written = self._channel.written_seq
                later = self._later(segment)
            found = self._record(size)
            if found is None:
                # the end of this segment's data (or a record a failed write left): go on
                if later is None:
                    if self._offset >= size and written > self._position:
                        self._skip(written - self._position)  # numbers given up at the tail
                    return False
                if later.first_seq > self._position:
                    self._skip(later.first_seq - self._position)
                self._open(later)
                continue
            header, payload = found
            if header.end_seq <= self._position:
                continue
            at = 0
            for _ in range(max(0, self._position - header.first_seq)):
                at = next(frame_ends(payload, at))
            self._payload, self._at = payload, at
            self._payload_seq = max(header.first_seq, self._position)
            self._payload_end = header.end_seq
            return True

    def _record(self, size: int) -> tuple[RecordHeader, memoryview] | None:
        """The record at ``_offset`` if it is whole and intact below ``size``; advances past it."""
        offset = self._offset
        if offset + HEADER_BYTES > size:
            return None
        raw = bytes(self._bytes(offset, HEADER_BYTES, size))
        header = decode_header(raw)
        if header is None or offset + header.size > size:
            return None
        payload = self._bytes(offset, header.size, size)[HEADER_BYTES:]
        segment = self._segment
        if (segment is None or not segment.checked) and not check_record(raw, header, payload):
            return None
        self._offset = offset + header.size
        return header, payload

    def _bytes(self, offset: int, length: int, size: int) -> memoryview:
        """``length`` bytes of the open segment at ``offset``, from the buffer (refilled when short)."""
        start = offset - self._buffer_at
        if start < 0 or start + length > len(self._buffer):
            want = min(max(READ_BLOCK_BYTES, length), size - offset)
            self._buffer = memoryview(os.pread(self._fd, want, offset))
            self._buffer_at = offset
            start = 0
        return self._buffer[start : start + length]

    def _later(self, segment: Segment) -> Segment | None:
        """Under the lock: the segment after ``segment`` in the channel, if any."""
        segments = self._channel.segments
        i = bisect.bisect_right([s.first_seq for s in segments], segment.first_seq)
        return segments[i] if i < len(segments) else None

    def _open_for_position(self) -> bool:
        for _attempt in range(3):  # a segment deleted between the look and the open: look again
            with self._log._lock:
                segments = list(self._channel.segments)
                written = self._channel.written_seq
            if not segments:
                if written > self._position:
                    self._skip(written - self._position)
                return False
            if self._position < segments[0].first_seq:
                self._skip(segments[0].first_seq - self._position)
            i = max(0, bisect.bisect_right([s.first_seq for s in segments], self._position) - 1)
            if self._open(segments[i]):
                return True
        return False

    def _open(self, segment: Segment) -> bool:
        self._leave()
        self._buffer = memoryview(b"")
        with self._log._lock:
            if segment.gone:
                return False  # deleted meanwhile: passed over
            segment.readers += 1  # before the open: the writer does not reuse its file now
        try:
            self._fd = os.open(segment.path, os.O_RDONLY)
        except OSError as e:
            with self._log._lock:
                segment.readers -= 1
            if e.errno != errno.ENOENT:  # a segment deleted meanwhile is passed over
                log.warning("durable log: cannot read %s: %s", segment.path, e.strerror or e)
            return False
        self._segment = segment
        # the sparse index: the last entry at or before the position
        i = bisect.bisect_right([seq for seq, _ in segment.index], self._position) - 1
        self._offset = segment.index[i][1] if i >= 0 else 0
        return True
