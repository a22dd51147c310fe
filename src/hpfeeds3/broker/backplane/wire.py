"""What the brokers of a cluster put on NATS, and what they accept from it (sans-I/O).

A NATS message carries one or more whole PUBLISH frames of one channel,
unchanged, or one part of a frame larger than the server's ``max_payload``.
Headers:

- ``Hpfeeds-Origin``: the sending broker process (16 hex digits, random per start);
- ``Hpfeeds-Seq``: the sequence number, on that channel from that origin, of
  the first frame carried;
- ``Hpfeeds-Count``: how many frames (1 for the parts of a split frame);
- ``Hpfeeds-Part``: ``i/n`` on the parts of a split frame only;
- ``Hpfeeds-Sig``: with a cluster key (``--cluster-key-file``), an
  HMAC-SHA256 of the other headers, the channel and the payload.

Anyone who can publish on NATS can send anything, so ``Inbound`` trusts
nothing it did not check: a message is delivered only as whole, well-formed
PUBLISH frames (parsed by the protocol's own decoder) whose channel is the one
its subject encodes, with the headers of a broker and a sequence number that
does not go backwards. Anything else is dropped and counted by reason. The
parts of a split frame are delivered whole and in order, or not at all: a
frame with a missing part is never delivered, and the gap in the sequence
numbers counts it as lost.

What anyone on NATS can make a broker hold is bounded: the (origin, channel)
entries (sequence baselines and split frames in flight) are an LRU of at most
``INBOUND_ENTRIES``, indexed by channel so that forgetting a channel costs its
own entries only. A sequence number more than ``SEQUENCE_WINDOW`` away from
the expected one (ahead or behind) is not trusted: that message is rejected
(``jump``) and its number held; only a next message that continues from it
moves the baseline, so one forged number can no longer make every later real
message look replayed (and a baseline moved by forged messages comes back
with the real node's next two). With a cluster key, a message whose
signature does not verify is rejected (``signature``) before it touches any
table: only a holder of the key (a broker) can set an origin's state.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Iterator
from enum import StrEnum

from ...protocol import (
    HEADER,
    HEADER_LEN,
    Decoder,
    FrameLimits,
    FrameTooLarge,
    ProtocolError,
    PublishRun,
    UnexpectedOpcode,
)

H_ORIGIN = "Hpfeeds-Origin"
H_SEQ = "Hpfeeds-Seq"
H_COUNT = "Hpfeeds-Count"
H_PART = "Hpfeeds-Part"
H_SIG = "Hpfeeds-Sig"

# (origin, channel) entries kept at once (sequence baselines, split frames in
# flight), least recently used evicted first. A real cluster needs one per
# broker process per subscribed channel; an evicted one only loses its
# baseline (the next message starts a fresh one, a gap then goes uncounted).
INBOUND_ENTRIES = 16_384
# How far from the expected sequence number a message is trusted: about a
# minute of one busy channel's frames. A longer link outage costs the first
# message after it (rejected as a jump; the next one re-baselines).
SEQUENCE_WINDOW = 1 << 22
# Shortest cluster key accepted (bytes of the key file, surrounding space stripped).
MIN_CLUSTER_KEY_BYTES = 16

_ORIGIN = re.compile(r"[0-9a-f]{16}")
_PART = re.compile(r"(\d{1,9})/(\d{1,9})")
_NUMBER = re.compile(r"\d{1,18}")


class Rejected(StrEnum):
    """Why a message from NATS was dropped: the ``reason`` label of ``cluster_rejected_total``."""

    HEADERS = "headers"  # no or malformed hpfeeds headers: not sent by a broker
    MALFORMED = "malformed"  # not a sequence of well-formed frames
    NOT_PUBLISH = "not_publish"  # a frame other than PUBLISH (ERROR, AUTH, SUBSCRIBE ...)
    TOO_LARGE = "too_large"  # a frame (or a reassembled one) above this broker's limit
    PARTIAL = "partial"  # ends inside a frame
    COUNT = "count"  # holds another number of frames than its header says
    CHANNEL = "channel"  # a frame's channel is not the one the subject encodes
    SEQUENCE = "sequence"  # its sequence number goes backwards (replayed or duplicated)
    REASSEMBLY_FULL = "reassembly_full"  # too many split frames in flight at once
    JUMP = "jump"  # its sequence number is too far from the expected one to trust (held until the next confirms it)
    SIGNATURE = "signature"  # no or wrong cluster-key signature (with --cluster-key-file)


def new_origin(random16: bytes) -> str:
    return random16[:8].hex()


def cluster_key(secret: bytes) -> bytes:
    """The signing key made from a key file's content (any length of at least ``MIN_CLUSTER_KEY_BYTES``)."""
    return hashlib.sha256(b"hpfeeds3 cluster key\n" + secret.strip()).digest()


def signature(key: bytes, channel: bytes, origin: str, seq: str, count: str, part: str, data: bytes) -> str:
    """HMAC-SHA256 of what a message says, its first 128 bits in hex (SHA-256 runs
    at about 1.7 GB/s a core with the CPU's SHA instructions: 0.16 ms per 256 KiB)."""
    h = hmac.new(key, f"{origin} {seq} {count} {part} {len(channel)}\n".encode(), hashlib.sha256)
    h.update(channel)
    h.update(data)
    return h.hexdigest()[:32]


def headers(
    origin: str,
    seq: int,
    count: int,
    part: tuple[int, int] | None = None,
    *,
    key: bytes | None = None,
    channel: bytes = b"",
    data: bytes = b"",
) -> dict[str, str]:
    """The headers of one NATS message; with ``key``, signed over ``channel`` and ``data`` too."""
    h = {H_ORIGIN: origin, H_SEQ: str(seq), H_COUNT: str(count)}
    if part is not None:
        h[H_PART] = f"{part[0]}/{part[1]}"
    if key is not None:
        h[H_SIG] = signature(key, channel, origin, h[H_SEQ], h[H_COUNT], h.get(H_PART, ""), data)
    return h


def frame_ends(data: bytes) -> Iterator[int]:
    """The offset just past each frame of ``data`` (whole frames, as the broker forwards them)."""
    pos = 0
    end = len(data)
    while pos < end:
        length, _ = HEADER.unpack_from(data, pos)
        pos += max(length, HEADER_LEN)
        yield min(pos, end)


def split(data: bytes, seq: int, count: int, limit: int) -> Iterator[tuple[bytes, int, int, tuple[int, int] | None]]:
    """``data`` (``count`` whole frames, the first numbered ``seq``) as NATS payloads of at most ``limit`` bytes.

    Yields ``(payload, seq, count, part)``: runs of whole frames where they fit,
    and each frame larger than ``limit`` as ``n`` parts ``(i, n)``.
    """
    if len(data) <= limit:
        yield data, seq, count, None
        return
    mv = memoryview(data)
    start = group = 0
    prev = 0
    for frame_end in frame_ends(data):
        if frame_end - prev > limit:
            if group:
                yield bytes(mv[start:prev]), seq, group, None
                seq += group
                group = 0
            n = -(-(frame_end - prev) // limit)
            for i in range(n):
                yield bytes(mv[prev + i * limit : min(prev + (i + 1) * limit, frame_end)]), seq, 1, (i, n)
            seq += 1
            start = frame_end
        elif frame_end - start > limit:
            yield bytes(mv[start:prev]), seq, group, None
            seq += group
            start, group = prev, 1
        else:
            group += 1
        prev = frame_end
    if group:
        yield bytes(mv[start:prev]), seq, group, None


def check_frames(data: bytes, channel: bytes, count: int, limits: FrameLimits) -> Rejected | None:
    """None if ``data`` is exactly ``count`` whole, well-formed PUBLISH frames of ``channel``."""
    # Runs: consecutive frames of one ident and channel are checked as one
    # item, their payloads never copied.
    decoder = Decoder.for_broker(limits, runs=True)
    try:
        items = decoder.feed(data)
    except FrameTooLarge:
        return Rejected.TOO_LARGE
    except UnexpectedOpcode:
        return Rejected.NOT_PUBLISH
    except ProtocolError:
        return Rejected.MALFORMED
    if decoder.buffered:
        return Rejected.PARTIAL
    frames = 0
    for item in items:
        if type(item) is not PublishRun:
            return Rejected.NOT_PUBLISH
        if item.channel != channel:
            return Rejected.CHANNEL
        frames += item.frames
    if frames != count:
        return Rejected.COUNT
    return None


class _Partial:
    __slots__ = ("buf", "n", "next", "seq")

    def __init__(self, seq: int, n: int) -> None:
        self.seq = seq
        self.n = n
        self.next = 0
        self.buf = bytearray()


class _Entry:
    """What is known of one (origin, channel): the next expected sequence number,
    a held jump, the split frame in flight."""

    __slots__ = ("expected", "jump", "partial")

    def __init__(self) -> None:
        self.expected: int | None = None
        # The sequence number that would continue a jump seen once (not yet trusted).
        self.jump: int | None = None
        self.partial: _Partial | None = None


class Accepted:
    """A message that passed every check: deliver ``data`` (``count`` frames)."""

    __slots__ = ("count", "data", "missed", "origin")

    def __init__(self, data: bytes, count: int, origin: str, missed: int) -> None:
        self.data = data
        self.count = count
        self.origin = origin
        # Frames of this (origin, channel) that never arrived before this one.
        self.missed = missed


class Inbound:
    """Checks, reassembles and sequences what other brokers send (one per broker).

    ``receive`` returns an ``Accepted``, a ``Rejected`` reason, or None (a part
    of a split frame was stored, or a broken split frame was discarded: the
    sequence gap will count it). Memory is bounded: at most ``max_entries``
    (origin, channel) entries, and split frames in flight hold at most
    ``reassembly_bytes`` in all, each at most the frame limit. Every operation
    is O(1) but ``forget``, which is O(entries of that channel).
    """

    def __init__(
        self,
        limits: FrameLimits,
        reassembly_bytes: int,
        *,
        key: bytes | None = None,
        max_entries: int = INBOUND_ENTRIES,
        window: int = SEQUENCE_WINDOW,
    ) -> None:
        self.limits = limits
        self.max_frame = limits.max_publish_frame_bytes
        self.reassembly_bytes = max(reassembly_bytes, self.max_frame)
        self.key = key
        self.max_entries = max(1, max_entries)
        self.window = window
        # (origin, channel) -> entry, least recently used first
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        # channel -> the origins with an entry for it
        self._by_channel: dict[bytes, set[str]] = {}
        # entries with a split frame in flight, oldest first
        self._partials: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._partial_bytes = 0
        # entries evicted to make room (a metric's source)
        self.evicted = 0

    @property
    def partial_bytes(self) -> int:
        return self._partial_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def expected(self, origin: str, channel: bytes) -> int | None:
        """The next sequence number expected from ``origin`` on ``channel`` (None: no baseline)."""
        entry = self._entries.get((origin, channel))
        return entry.expected if entry is not None else None

    def forget(self, channel: bytes) -> None:
        """No local subscriber any more: a later subscription starts a fresh baseline."""
        for origin in self._by_channel.pop(channel, ()):
            self._remove((origin, channel), unindex=False)

    def receive(self, channel: bytes, hdrs: dict[str, str] | None, data: bytes) -> Accepted | Rejected | None:
        if not hdrs:
            return Rejected.HEADERS
        origin = hdrs.get(H_ORIGIN, "")
        seq_text = hdrs.get(H_SEQ, "")
        count_text = hdrs.get(H_COUNT, "")
        if not (_ORIGIN.fullmatch(origin) and _NUMBER.fullmatch(seq_text) and _NUMBER.fullmatch(count_text)):
            return Rejected.HEADERS
        part = hdrs.get(H_PART)
        if self.key is not None:
            sent = hdrs.get(H_SIG, "")
            if len(sent) != 32:  # no signature: refused before hashing the payload
                return Rejected.SIGNATURE
            wanted = signature(self.key, channel, origin, seq_text, count_text, part or "", data)
            if not hmac.compare_digest(sent.encode("ascii", "replace"), wanted.encode()):
                return Rejected.SIGNATURE
        seq, count = int(seq_text), int(count_text)
        if count < 1:
            return Rejected.HEADERS
        key = (origin, channel)
        if part is not None:
            m = _PART.fullmatch(part)
            if m is None or count != 1:
                return Rejected.HEADERS
            whole = self._reassemble(key, seq, int(m.group(1)), int(m.group(2)), data)
            if whole is None or isinstance(whole, Rejected):
                return whole
            data = whole
        if len(data) > self.max_frame * count:
            return Rejected.TOO_LARGE
        why = check_frames(data, channel, count, self.limits)
        if why is not None:
            return why
        entry = self._entry(key)
        expected = entry.expected
        if expected is not None and seq != entry.jump:
            if not -self.window <= seq - expected <= self.window:
                entry.jump = seq + count  # held: trusted only if the next message continues from it
                return Rejected.JUMP
            if seq < expected:
                return Rejected.SEQUENCE
        entry.expected = seq + count
        entry.jump = None
        return Accepted(data, count, origin, seq - expected if expected is not None and seq > expected else 0)

    def _entry(self, key: tuple[str, bytes]) -> _Entry:
        """The entry of ``key``, made (evicting the least recently used) or marked as used now."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        while len(self._entries) >= self.max_entries:
            self.evicted += 1
            self._remove(next(iter(self._entries)))
        entry = self._entries[key] = _Entry()
        origins = self._by_channel.get(key[1])
        if origins is None:
            origins = self._by_channel[key[1]] = set()
        origins.add(key[0])
        return entry

    def _remove(self, key: tuple[str, bytes], *, unindex: bool = True) -> None:
        entry = self._entries.pop(key)
        if entry.partial is not None:
            self._drop(key, entry)
        if unindex:
            origins = self._by_channel[key[1]]
            origins.discard(key[0])
            if not origins:
                del self._by_channel[key[1]]

    def _reassemble(self, key: tuple[str, bytes], seq: int, i: int, n: int, data: bytes) -> bytes | Rejected | None:
        if not 0 <= i < n or n < 2:
            return Rejected.HEADERS
        entry = self._entry(key)
        p = entry.partial
        if i == 0:
            if p is not None:
                self._abandon(key, entry)  # the rest of that frame never came
            p = entry.partial = _Partial(seq, n)
            self._partials[key] = None
        elif p is None or p.seq != seq or p.n != n or p.next != i:
            if p is not None:
                self._abandon(key, entry)
            # A part of this frame never came: it is lost, and the next
            # delivered message must count it even if it is the first one seen.
            if entry.expected is None:
                entry.expected = seq
            return None
        if len(p.buf) + len(data) > self.max_frame:
            self._drop(key, entry)
            return Rejected.TOO_LARGE
        while self._partial_bytes + len(data) > self.reassembly_bytes:
            oldest = next(iter(self._partials))
            self._abandon(oldest, self._entries[oldest])
            if oldest == key:
                return Rejected.REASSEMBLY_FULL
        p.buf += data
        p.next += 1
        self._partial_bytes += len(data)
        if p.next < n:
            return None
        self._drop(key, entry)
        return bytes(p.buf)

    def _drop(self, key: tuple[str, bytes], entry: _Entry) -> None:
        p = entry.partial
        assert p is not None
        entry.partial = None
        del self._partials[key]
        self._partial_bytes -= len(p.buf)

    def _abandon(self, key: tuple[str, bytes], entry: _Entry) -> None:
        """Drop an incomplete frame; the sequence gap will count it as lost."""
        assert entry.partial is not None
        if entry.expected is None:
            entry.expected = entry.partial.seq
        self._drop(key, entry)
