"""Positions that follow what the collector's TCP acknowledged, never ``write()``.

A durable key's position may only move past a message once the peer's
kernel has acknowledged the bytes that carried it. Linux tells a sender
exactly that: ``TCP_INFO``'s ``tcpi_bytes_acked`` (every data byte
acknowledged since the connection began) or ``SIOCOUTQ`` (bytes not yet
acknowledged). ``AckTracker`` keeps a ring of marks, one per write that ended
a run of durable messages: (stream offset after the write, channel, log
position after it), and maps an acknowledged offset back to a position per
channel: the last mark at or before it.

What an acknowledgement proves (docs/durable.md):

- After the collector closed with FIN (``CloseKind.CLEAN``), everything its
  kernel acknowledged was read by its process (Linux answers a close with
  unread data with RST), so the position is exactly the acknowledged one:
  no duplicate.
- After RST, a timeout, a cut or a close by the broker (``ABORTIVE``), the
  acknowledged bytes may sit unread in the collector's receive buffer: the
  position goes back ``overlap_bytes`` (at least the peer's receive buffer),
  so duplicates are possible and loss is not. It never goes back before
  where this connection started.
- TLS: the kernel counts ciphertext (handshake, tickets, record overhead).
  With ``C`` bytes of ciphertext handed to the transport and ``A``
  acknowledged, the last ``C - A`` ciphertext bytes carry at most ``C - A``
  plaintext bytes, so ``P - (C - A)`` plaintext bytes were acknowledged at
  least: a few duplicates, never a skip.
- Without ``TCP_INFO`` or ``SIOCOUTQ`` (not Linux), the whole send buffer
  (``SO_SNDBUF``) counts as unacknowledged: more duplicates.

Counting starts with the connection: every byte handed to the transport
(INFO, ERROR, messages of other channels, TLS handshake) goes through
``wrote`` or ``wrote_wire``, so stream offsets match the kernel's.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections import deque
from typing import Protocol, overload

# struct tcp_info (uapi/linux/tcp.h): tcpi_bytes_acked is the u64 at byte 120.
_TCP_INFO_BYTES = 256
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120
# SIOCOUTQ (= TIOCOUTQ): bytes in the send queue not yet acknowledged.
_SIOCOUTQ = 0x5411
# Marks kept per connection; past it the oldest is forgotten (its channel's
# position then moves with a later mark: duplicates, never a skip).
MAX_MARKS = 16_384


class SocketLike(Protocol):
    """A socket, or what a transport's ``get_extra_info("socket")`` gives (asyncio's and uvloop's)."""

    def fileno(self) -> int: ...

    @overload
    def getsockopt(self, level: int, option: int) -> int: ...

    @overload
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


class CloseKind(enum.Enum):
    CLEAN = "clean"  # the peer closed with FIN: what it acknowledged, it read
    ABORTIVE = "abortive"  # RST, timeout, a cut, a close by the broker: apply the overlap


def close_kind(*, peer_fin: bool, reset: bool, closed_by_broker: bool) -> CloseKind:
    """The FIN-vs-RST rule: clean only when the peer ended with FIN, no RST came, and the broker did not close."""
    return CloseKind.CLEAN if peer_fin and not reset and not closed_by_broker else CloseKind.ABORTIVE


def tcp_bytes_acked(sock: SocketLike) -> int | None:
    """``tcpi_bytes_acked`` (Linux 4.1+), or ``None`` where the kernel or OS does not have it."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_BYTES)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_OFFSET + _BYTES_ACKED.size:
        return None
    return int(_BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0])


def unacked_in_kernel(sock: SocketLike) -> int | None:
    """``SIOCOUTQ``: bytes in the kernel's send queue not yet acknowledged; ``None`` where it is missing."""
    try:
        import fcntl
        import sys

        if not sys.platform.startswith("linux"):
            return None
        raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
    except (ImportError, OSError):
        return None
    return int(struct.unpack("i", raw)[0])


def acked_wire_bytes(sock: SocketLike, wire_written: int, buffered: int) -> tuple[int, bool]:
    """Bytes of the stream the peer acknowledged, and whether the kernel said so exactly.

    ``wire_written``: every byte handed to the transport since the connection
    began; ``buffered``: those still in the transport's own buffer (not yet in
    the kernel). Readable after an RST too, until the socket is closed.
    """
    acked = tcp_bytes_acked(sock)
    if acked is not None:
        return acked, True
    in_kernel = wire_written - buffered
    outq = unacked_in_kernel(sock)
    if outq is not None:
        return max(0, in_kernel - outq), True
    try:
        send_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return 0, False
    return max(0, in_kernel - send_buffer), False


class AckTracker:
    """One connection's marks, and the positions its acknowledgements prove.

    ``start(channel, position)`` when the connection begins sending a channel
    (replay from ``position``); ``wrote`` for every write; ``acknowledged``
    with each sample (every ~100 ms and at close); ``positions(kind)`` gives
    each channel's position to commit.
    """

    def __init__(self, overlap_bytes: int, *, max_marks: int = MAX_MARKS) -> None:
        self.overlap_bytes = overlap_bytes
        self.max_marks = max_marks
        self.plain_written = 0  # plaintext handed to the transport since the connection began
        self.wire_written = 0  # the same on the wire (ciphertext under TLS)
        self.acked_plain = 0  # plaintext offset proven acknowledged (exact without TLS)
        self._marks: deque[tuple[int, bytes, int]] = deque()  # (plaintext end offset, channel, position)
        self._floor: dict[bytes, int] = {}  # positions at the offset the marks were trimmed to

    def start(self, channel: bytes, position: int) -> None:
        """This connection sends ``channel`` from ``position`` on (no position goes below it)."""
        self._floor.setdefault(channel, position)

    def wrote(self, nbytes: int, *, wire_bytes: int | None = None, channel: bytes | None = None,
              position: int | None = None) -> None:  # fmt: skip
        """``nbytes`` of plaintext handed to the transport (``wire_bytes`` on the wire, under TLS);
        ``channel``/``position``: they end a run of that channel's log, the position after it."""
        self.plain_written += nbytes
        self.wire_written += nbytes if wire_bytes is None else wire_bytes
        if channel is not None and position is not None:
            if len(self._marks) >= self.max_marks:
                self._marks.popleft()
            self._marks.append((self.plain_written, channel, position))

    def wrote_wire(self, nbytes: int) -> None:
        """Bytes on the wire that carry no plaintext (a TLS handshake, a ticket, an alert)."""
        self.wire_written += nbytes

    def acknowledged(self, acked_wire: int) -> None:
        """The peer's kernel acknowledged ``acked_wire`` bytes of the stream (``acked_wire_bytes``)."""
        proven = self.plain_written - (self.wire_written - acked_wire)
        if proven > self.acked_plain:
            self.acked_plain = proven
        # marks further back than the overlap can no longer be asked for
        limit = self.acked_plain - self.overlap_bytes
        marks = self._marks
        while marks and marks[0][0] <= limit:
            _, channel, position = marks.popleft()
            self._floor[channel] = position

    def sample(self, sock: SocketLike, buffered: int = 0) -> bool:
        """Read the socket's acknowledgement now; ``False`` where only an estimate exists (not Linux)."""
        acked, exact = acked_wire_bytes(sock, self.wire_written, buffered)
        self.acknowledged(acked)
        return exact

    def positions(self, kind: CloseKind = CloseKind.CLEAN) -> dict[bytes, int]:
        """Each channel's position proven by the acknowledgements so far (``ABORTIVE``: less the overlap)."""
        offset = self.acked_plain if kind is CloseKind.CLEAN else self.acked_plain - self.overlap_bytes
        out = dict(self._floor)
        for end, channel, position in self._marks:
            if end > offset:
                break
            out[channel] = position
        return out
