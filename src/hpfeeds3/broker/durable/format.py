"""The on-disk format of a channel log: segment files of checksummed records.

A channel's log is a directory of segment files named by the sequence
number of their first message (``00000000000000000042.seg``), each a run of
records::

    magic   4 bytes  b"HPD2" (b"HPD1": the checksum is zlib's CRC-32)
    length  u32      payload bytes
    first   u64      sequence number of the payload's first message
    count   u32      messages (hpfeeds frames) in the payload
    time    u64      wall clock at write, milliseconds since the epoch
    crc     u32      CRC-32C of the 28 bytes above and the payload
    payload          the PUBLISH frames exactly as the broker received them

(little-endian). The magic names the checksum, record by record: ``HPD2``
records carry a CRC-32C (Castagnoli, computed by the processor's CRC
instruction through ``google-crc32c``, about eight times faster than zlib's
CRC-32 here), ``HPD1`` records zlib's CRC-32. Logs of either, or both (a log
an earlier version wrote, appended by this one), are read the same way; a
broker where ``google-crc32c`` has no compiled extension writes ``HPD1``.

A message's sequence number is its place in the channel's log; a record
holds ``count`` consecutive ones. Numbers may skip (messages that could not
be stored), never go back. A record is at most
``RECORD_MAX_BYTES`` of payload, or one frame when a single frame is larger.

Recovery: the last segment is read to its end; the first record that is
incomplete, has no magic, fails its CRC or goes back in numbering ends the
valid data, and the file is cut there (a crash mid-write leaves at most one
torn record; a reused file, the old data after the new).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import google_crc32c

MAGIC_CRC32 = b"HPD1"
MAGIC_CRC32C = b"HPD2"
# (crc, data) -> crc, for each magic; google-crc32c takes bytes only (no memoryview)
_CHECKSUMS: dict[bytes, Callable[[int, bytes], int]] = {
    MAGIC_CRC32: lambda crc, data: zlib.crc32(data, crc),
    MAGIC_CRC32C: google_crc32c.extend,
}
# What this broker writes: CRC-32C where the processor computes it, else CRC-32.
MAGIC = MAGIC_CRC32C if google_crc32c.implementation == "c" else MAGIC_CRC32
HEADER = struct.Struct("<4sIQIQI")
HEADER_BYTES = HEADER.size  # 32
_CRC_OFFSET = HEADER_BYTES - 4
# Records are split at frame boundaries to this size, so a reader holds one
# record at a time in bounded memory (a larger single frame is one record).
RECORD_MAX_BYTES = 256 * 1024
# A header naming more than this is torn, not a record (hpfeeds frames are far smaller).
_SANE_RECORD_BYTES = 64 * 1024 * 1024
# One sparse-index entry (first seq -> offset) per this many bytes of a segment.
INDEX_EVERY_BYTES = 256 * 1024
SEGMENT_SUFFIX = ".seg"
CHANNEL_FILE = "CHANNEL"

_FRAME_LENGTH = struct.Struct("!I")
_CRC = struct.Struct("<I")
_UNSAFE = re.compile(rb"[^A-Za-z0-9._-]")

Bytes = bytes | bytearray | memoryview


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def segment_seq(name: str) -> int | None:
    """The first sequence number a segment file name carries, or ``None`` for another file."""
    stem, dot, suffix = name.partition(".")
    if "." + suffix != SEGMENT_SUFFIX or not dot or len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)


def channel_dirname(channel: bytes) -> str:
    """A file name for any channel (bytes up to 255): a readable prefix and a hash.

    The exact name is kept in the directory's ``CHANNEL`` file."""
    readable = _UNSAFE.sub(b"_", channel[:48]).decode("ascii")
    return f"{readable}.{hashlib.sha256(channel).hexdigest()[:20]}"


def encode_record(first_seq: int, count: int, time_ms: int, payload: bytes, magic: bytes = MAGIC) -> bytes:
    return encode_header(first_seq, count, time_ms, payload, magic) + payload


def encode_header(first_seq: int, count: int, time_ms: int, payload: bytes, magic: bytes = MAGIC) -> bytes:
    """The header of a record whose payload is ``payload``, written before it."""
    head = HEADER.pack(magic, len(payload), first_seq, count, time_ms, 0)[:_CRC_OFFSET]
    extend = _CHECKSUMS[magic]
    return head + _CRC.pack(extend(extend(0, head), payload))


@dataclass(frozen=True, slots=True)
class RecordHeader:
    magic: bytes
    length: int
    first_seq: int
    count: int
    time_ms: int
    crc: int

    @property
    def end_seq(self) -> int:
        return self.first_seq + self.count

    @property
    def size(self) -> int:
        return HEADER_BYTES + self.length


def decode_header(raw: bytes) -> RecordHeader | None:
    """The header in ``raw`` (32 bytes), ``None`` if it cannot be one."""
    if len(raw) < HEADER_BYTES:
        return None
    magic, length, first_seq, count, time_ms, crc = HEADER.unpack_from(raw)
    if magic not in _CHECKSUMS or length > _SANE_RECORD_BYTES or count == 0 or length < count * 5:
        return None
    return RecordHeader(magic, length, first_seq, count, time_ms, crc)


def check_record(raw_header: bytes, header: RecordHeader, payload: Bytes) -> bool:
    if len(payload) != header.length:
        return False
    extend = _CHECKSUMS[header.magic]
    return extend(extend(0, raw_header[:_CRC_OFFSET]), bytes(payload)) == header.crc


def frame_ends(data: Bytes, start: int = 0) -> Iterator[int]:
    """The offset after each hpfeeds frame in ``data`` (whole frames, as the broker received them)."""
    end = len(data)
    at = start
    while at < end:
        length = _FRAME_LENGTH.unpack_from(data, at)[0] if at + 4 <= end else end - at
        at = min(end, at + max(length, 5))  # a malformed length cannot loop or overrun
        yield at


def split_records(data: bytes, frames: int, limit: int = RECORD_MAX_BYTES) -> list[tuple[bytes, int]]:
    """``data`` (``frames`` whole frames) as payloads of at most ``limit`` bytes (or one frame), with counts."""
    if len(data) <= limit:
        return [(data, frames)]
    out: list[tuple[bytes, int]] = []
    start = last = 0
    count = 0
    for end in frame_ends(data):
        if end - start > limit and count:
            out.append((data[start:last], count))
            start, count = last, 0
        count += 1
        last = end
    out.append((data[start:last], count))
    return out


@dataclass(slots=True)
class ScanResult:
    """What reading a segment to its end found."""

    valid_bytes: int = 0
    end_seq: int = 0
    first_time_ms: int = 0
    last_time_ms: int = 0
    records: int = 0
    torn_bytes: int = 0  # bytes after the last valid record (cut on recovery)
    index: list[tuple[int, int]] = field(default_factory=list)


def scan_segment(path: str, first_seq: int) -> ScanResult:
    """Read every record of a segment, checking each; stops at the first bad one."""
    result = ScanResult(end_seq=first_seq, index=[(first_seq, 0)])
    size = os.path.getsize(path)
    next_index = INDEX_EVERY_BYTES
    with open(path, "rb") as f:
        offset = 0
        while offset + HEADER_BYTES <= size:
            raw = f.read(HEADER_BYTES)
            header = decode_header(raw)
            if header is None or header.first_seq < result.end_seq or offset + header.size > size:
                break
            payload = f.read(header.length)
            if not check_record(raw, header, payload):
                break
            if offset >= next_index:
                result.index.append((header.first_seq, offset))
                next_index = offset + INDEX_EVERY_BYTES
            offset += header.size
            result.end_seq = header.end_seq
            result.first_time_ms = result.first_time_ms or header.time_ms
            result.last_time_ms = header.time_ms
            result.records += 1
    result.valid_bytes = offset
    result.torn_bytes = size - offset
    return result


def first_header(path: str) -> RecordHeader | None:
    """The first record's header of a sealed segment (its oldest time), unchecked."""
    try:
        with open(path, "rb") as f:
            return decode_header(f.read(HEADER_BYTES))
    except OSError:
        return None
