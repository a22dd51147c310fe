"""What the brokers of a cluster put on NATS, and what they accept from it (sans-I/O).

A NATS message carries one or more whole PUBLISH frames of one channel,
unchanged, or one part of a frame larger than the server's ``max_payload``.
Headers:

- ``Hpfeeds-Origin``: the sending broker process (16 hex digits, random per start);
- ``Hpfeeds-Seq``: the sequence number, on that channel from that origin, of
  the first frame carried;
- ``Hpfeeds-Count``: how many frames (1 for the parts of a split frame);
- ``Hpfeeds-Part``: ``i/n`` on the parts of a split frame only.

Anyone who can publish on NATS can send anything, so ``Inbound`` trusts
nothing it did not check: a message is delivered only as whole, well-formed
PUBLISH frames (parsed by the protocol's own decoder) whose channel is the one
its subject encodes, with the headers of a broker and a sequence number that
does not go backwards. Anything else is dropped and counted by reason. The
parts of a split frame are delivered whole and in order, or not at all: a
frame with a missing part is never delivered, and the gap in the sequence
numbers counts it as lost.
"""

from __future__ import annotations

import re
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


def new_origin(random16: bytes) -> str:
    return random16[:8].hex()


def headers(origin: str, seq: int, count: int, part: tuple[int, int] | None = None) -> dict[str, str]:
    h = {H_ORIGIN: origin, H_SEQ: str(seq), H_COUNT: str(count)}
    if part is not None:
        h[H_PART] = f"{part[0]}/{part[1]}"
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
    sequence gap will count it). Memory is bounded: split frames in flight hold
    at most ``reassembly_bytes`` in all, each at most the frame limit.
    """

    def __init__(self, limits: FrameLimits, reassembly_bytes: int) -> None:
        self.limits = limits
        self.max_frame = limits.max_publish_frame_bytes
        self.reassembly_bytes = max(reassembly_bytes, self.max_frame)
        # (origin, channel) -> next expected sequence number
        self.expected: dict[tuple[str, bytes], int] = {}
        self._partials: dict[tuple[str, bytes], _Partial] = {}
        self._partial_bytes = 0

    @property
    def partial_bytes(self) -> int:
        return self._partial_bytes

    def forget(self, channel: bytes) -> None:
        """No local subscriber any more: a later subscription starts a fresh baseline."""
        for key in [k for k in self.expected if k[1] == channel]:
            del self.expected[key]
        for key in [k for k in self._partials if k[1] == channel]:
            self._drop(key)

    def receive(self, channel: bytes, hdrs: dict[str, str] | None, data: bytes) -> Accepted | Rejected | None:
        if not hdrs:
            return Rejected.HEADERS
        origin = hdrs.get(H_ORIGIN, "")
        seq_text = hdrs.get(H_SEQ, "")
        count_text = hdrs.get(H_COUNT, "")
        if not (_ORIGIN.fullmatch(origin) and _NUMBER.fullmatch(seq_text) and _NUMBER.fullmatch(count_text)):
            return Rejected.HEADERS
        seq, count = int(seq_text), int(count_text)
        if count < 1:
            return Rejected.HEADERS
        key = (origin, channel)
        part = hdrs.get(H_PART)
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
        expected = self.expected.get(key)
        if expected is not None and seq < expected:
            return Rejected.SEQUENCE
        self.expected[key] = seq + count
        return Accepted(data, count, origin, seq - expected if expected is not None else 0)

    def _reassemble(self, key: tuple[str, bytes], seq: int, i: int, n: int, data: bytes) -> bytes | Rejected | None:
        if not 0 <= i < n or n < 2:
            return Rejected.HEADERS
        p = self._partials.get(key)
        if i == 0:
            if p is not None:
                self._abandon(key)  # the rest of that frame never came
            p = self._partials[key] = _Partial(seq, n)
        elif p is None or p.seq != seq or p.n != n or p.next != i:
            if p is not None:
                self._abandon(key)
            # A part of this frame never came: it is lost, and the next
            # delivered message must count it even if it is the first one seen.
            self.expected.setdefault(key, seq)
            return None
        if len(p.buf) + len(data) > self.max_frame:
            self._drop(key)
            return Rejected.TOO_LARGE
        while self._partial_bytes + len(data) > self.reassembly_bytes:
            oldest = next(iter(self._partials))
            self._abandon(oldest)
            if oldest == key:
                return Rejected.REASSEMBLY_FULL
        p.buf += data
        p.next += 1
        self._partial_bytes += len(data)
        if p.next < n:
            return None
        self._drop(key)
        return bytes(p.buf)

    def _drop(self, key: tuple[str, bytes]) -> None:
        p = self._partials.pop(key)
        self._partial_bytes -= len(p.buf)

    def _abandon(self, key: tuple[str, bytes]) -> None:
        """Drop an incomplete frame; the sequence gap will count it as lost."""
        self.expected.setdefault(key, self._partials[key].seq)
        self._drop(key)
