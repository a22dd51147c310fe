"""What the load generator puts on the wire, and how subscribers check it.

Rules of this module:

- A publisher never encodes a message on the hot path. ``Stream`` keeps one
  pre-encoded batch (about 256 KiB of back-to-back PUBLISH frames) and turns it
  into the next batch by rewriting the changed bytes of the batch counter in
  every frame with one strided slice assignment per byte (a C loop).
- A subscriber never parses a message on the hot path either. Every frame of a
  run has the same length, so a chunk of whole frames is checked by comparing
  it, byte for byte, with what the publisher must have sent (``Expected``,
  the same ``Stream`` regenerated). Frames of several publishers interleave
  only at run boundaries, found with one regular-expression match per run on
  the column of publisher ids. Any lost, duplicated, reordered, corrupted or
  foreign frame makes the comparison fail, and ``describe_mismatch`` parses
  the chunk properly to say what went wrong.

Message payload layout (little-endian)::

    offset 0   u8   publisher id (0..254)
    offset 1   u32  batch number
    offset 5   u32  index in the batch   (sequence number = batch * K + index)
    offset 9   u64  send time, time.monotonic_ns() (latency scenario only)
    offset 17  ...  padding up to the payload size
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import struct
import sys
from array import array
from dataclasses import dataclass

from hpfeeds3.protocol import (
    HEADER,
    HEADER_LEN,
    Decoder,
    Error,
    Info,
    ProtocolError,
    Publish,
    encode_auth,
    encode_publish,
    encode_subscribe,
    sign,
)

BATCH_BYTES = 256 * 1024  # one write of a publisher
MIN_PAYLOAD = 17  # the fields above
MAX_PUBLISHERS = 255
PAYLOAD_FIELDS = struct.Struct("<BIIQ")  # pid, batch, index, send time
PID_OFF, BATCH_OFF, INDEX_OFF, TIME_OFF = 0, 1, 5, 9
_PAD = b"hpfeeds-bench-payload."


def _padding(n: int) -> bytes:
    return (_PAD * (n // len(_PAD) + 1))[:n]


def _le_u32_column(values: range) -> bytes:
    col = array("I", values)
    if sys.byteorder != "little":
        col.byteswap()
    return col.tobytes()


class Stream:
    """The endless, deterministic sequence of frames one publisher sends.

    ``next_batch()`` returns the *same* ``bytearray`` each time, rewritten in
    place: send (or compare) it completely before asking for the next one.
    """

    __slots__ = ("_batch_off", "batch", "buf", "frame_len", "frames_per_batch", "payload_off", "pid")

    def __init__(self, ident: bytes, channel: bytes, pid: int, payload_size: int, batch_bytes: int = BATCH_BYTES):
        if not 0 <= pid < MAX_PUBLISHERS:
            raise ValueError(f"publisher id {pid} out of range")
        if payload_size < MIN_PAYLOAD:
            raise ValueError(f"payload must be at least {MIN_PAYLOAD} bytes")
        payload = PAYLOAD_FIELDS.pack(pid, 0, 0, 0) + _padding(payload_size - MIN_PAYLOAD)
        frame = encode_publish(ident, channel, payload)
        self.pid = pid
        self.frame_len = len(frame)
        self.payload_off = self.frame_len - payload_size
        self.frames_per_batch = k = max(1, batch_bytes // self.frame_len)
        self.buf = bytearray(frame * k)
        index = _le_u32_column(range(k))
        first = self.payload_off + INDEX_OFF
        for b in range(4):
            self.buf[first + b :: self.frame_len] = index[b::4]
        self._batch_off = self.payload_off + BATCH_OFF
        self.batch = -1

    def next_batch(self) -> bytearray:
        prev = self.batch
        self.batch = batch = prev + 1
        if batch:
            # Only the bytes of the counter that changed are rewritten (usually one).
            old = max(prev, 0).to_bytes(4, "little")
            new = batch.to_bytes(4, "little")
            k = self.frames_per_batch
            for b in range(4):
                if old[b] != new[b]:
                    self.buf[self._batch_off + b :: self.frame_len] = bytes((new[b],)) * k
        return self.buf

    @property
    def sent(self) -> int:
        """Frames handed out so far (whole batches)."""
        return (self.batch + 1) * self.frames_per_batch


class Expected:
    """A subscriber's view of one publisher: the bytes it must receive next."""

    __slots__ = ("_batch", "_off", "_stream", "frames")

    def __init__(self, stream: Stream):
        self._stream = stream
        self._batch = memoryview(stream.next_batch())
        self._off = 0
        self.frames = 0  # frames received and verified

    def match(self, buf: bytearray, start: int, end: int) -> int:
        """Check that ``buf[start:end]`` (whole frames) is exactly what comes
        next; return -1, or the offset from which it is not (state stays at
        the last verified frame)."""
        frame_len = self._stream.frame_len
        pos = start
        while pos < end:
            batch = self._batch
            take = min(len(batch) - self._off, end - pos)
            if not buf.startswith(batch[self._off : self._off + take], pos):
                return pos
            pos += take
            self.frames += take // frame_len
            self._off += take
            if self._off == len(batch):
                self._batch = memoryview(self._stream.next_batch())
                self._off = 0
        return -1


class Checker:
    """Verifies one subscriber connection's stream of fixed-size frames.

    ``feed`` takes a buffer holding whole frames only (the caller keeps the
    remainder) and returns ``None`` or a description of the first fault.
    """

    __slots__ = ("_runs", "expected", "frame_len", "pid_off")

    def __init__(self, streams: list[Stream]):
        lens = {s.frame_len for s in streams}
        if len(lens) != 1:
            raise ValueError("all publishers of a checked channel must send frames of one size")
        self.frame_len = lens.pop()
        self.pid_off = streams[0].payload_off + PID_OFF
        self.expected = {s.pid: Expected(s) for s in streams}
        self._runs = {pid: re.compile(re.escape(bytes((pid,))) + b"+") for pid in self.expected}

    @property
    def frames(self) -> int:
        return sum(e.frames for e in self.expected.values())

    def feed(self, buf: bytearray, end: int) -> str | None:
        f = self.frame_len
        pids = bytes(memoryview(buf)[self.pid_off : end : f])
        n = len(pids)
        i = 0
        while i < n:
            pid = pids[i]
            exp = self.expected.get(pid)
            run = self._runs.get(pid)
            if exp is None or run is None:
                return describe_mismatch(buf, i * f, end, self)
            m = run.match(pids, i)
            j = m.end() if m else i + 1
            bad = exp.match(buf, i * f, j * f)
            if bad >= 0:
                return describe_mismatch(buf, bad, end, self)
            i = j
        return None

    def missing(self, totals: dict[int, int]) -> dict[int, int]:
        """Per publisher, how many of its ``totals`` frames have not arrived."""
        return {pid: n - self.expected[pid].frames for pid, n in totals.items() if n != self.expected[pid].frames}


def describe_mismatch(buf: bytearray, start: int, end: int, checker: Checker) -> str:
    """Parse ``buf[start:end]`` frame by frame and say what is wrong with it."""
    pos = start
    while pos + HEADER_LEN <= end:
        length, opcode = HEADER.unpack_from(buf, pos)
        if opcode == 0:
            body = bytes(buf[pos + HEADER_LEN : min(pos + length, end)])
            return f"broker sent ERROR: {body.decode('utf-8', 'replace')!r}"
        if opcode != 3 or length != checker.frame_len or pos + length > end:
            return f"unexpected frame at byte {pos - start}: opcode {opcode}, length {length}"
        pid, batch, index, _ = PAYLOAD_FIELDS.unpack_from(buf, pos + checker.pid_off)
        exp = checker.expected.get(pid)
        if exp is None:
            return f"message from unknown publisher id {pid}"
        k = exp._stream.frames_per_batch
        got = batch * k + index
        want = exp.frames
        if got != want:
            kind = "lost" if got > want else "duplicated or reordered"
            return f"publisher {pid}: got message #{got}, expected #{want} ({kind})"
        if exp.match(bytearray(buf[pos : pos + length]), 0, length) >= 0:
            return f"publisher {pid}: message #{got} is corrupted"
        pos += length
    return "stream does not match what was published"


# --- connections -------------------------------------------------------------------


def client_decoder() -> Decoder:
    return Decoder.for_client()


class BenchError(Exception):
    """The run is invalid: lost/duplicated/reordered messages, a refused
    handshake, a broker ERROR, a timeout."""


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def client_tls_context(ca: str | None, version: str | None = None) -> ssl.SSLContext:
    """The load's client context; ``version`` ("1.2", "1.3"): offer that TLS version only."""
    ctx = ssl.create_default_context(cafile=ca)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[version]
    return ctx


def set_linger_reset(sock: socket.socket) -> None:
    """Close with RST: thousands of handshakes per second must not fill the
    ephemeral port range with TIME_WAIT sockets."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Client:
    """A blocking client connection used to set a scenario up (not on the hot path)."""

    def __init__(self, sock: socket.socket, ident: bytes):
        self.sock = sock
        self.ident = ident
        self.decoder = client_decoder()
        self._queue: list[object] = []

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        ident: bytes,
        secret: bytes,
        *,
        tls: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> Client:
        """Connect, read INFO, send AUTH (nothing comes back on success)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        client = cls(sock, ident)
        info = client.read_frame(timeout)
        if not isinstance(info, Info):
            raise BenchError(f"expected INFO from the broker, got {info!r}")
        sock.sendall(encode_auth(ident, sign(info.nonce, secret)))
        return client

    def read_frame(self, timeout: float) -> object:
        """The next frame; an ERROR frame, a close or a timeout raise ``BenchError``."""
        self.sock.settimeout(timeout)
        while not self._queue:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise BenchError(f"no answer from the broker within {timeout} s") from None
            if not data:
                raise BenchError("the broker closed the connection")
            try:
                self._queue.extend(self.decoder.feed(data))
            except ProtocolError as e:
                raise BenchError(f"broker broke the protocol: {e}") from None
        frame = self._queue.pop(0)
        if isinstance(frame, Error):
            raise BenchError(f"broker sent ERROR: {frame.message!r}")
        return frame

    def subscribe_confirmed(self, channel: bytes, marker: bytes, timeout: float) -> None:
        """SUBSCRIBE, then PUBLISH ``marker`` to the same channel and wait for
        it to come back: the broker handles one connection's frames in order,
        so once the marker is back the subscription is in place."""
        self.sock.sendall(encode_subscribe(self.ident, channel) + encode_publish(self.ident, channel, marker))
        self.wait_for(channel, marker, timeout)

    def wait_for(self, channel: bytes, marker: bytes, timeout: float) -> None:
        """Read until ``marker`` arrives on ``channel``; other setup markers are skipped."""
        while True:
            frame = self.read_frame(timeout)
            if isinstance(frame, Publish) and frame.channel == channel and frame.payload == marker:
                return
            if not (isinstance(frame, Publish) and frame.payload.startswith(SETUP_PREFIX)):
                raise BenchError(f"unexpected frame during setup: {frame!r}")

    @property
    def idle(self) -> bool:
        """Nothing received and not yet consumed."""
        return not self._queue and self.decoder.buffered == 0

    def check_no_error(self) -> None:
        """Raise if the broker sent this (publish-only) connection anything."""
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        finally:
            self.sock.setblocking(True)
        if not data:
            raise BenchError("the broker closed a publisher connection")
        for frame in self.decoder.feed(data):
            if isinstance(frame, Error):
                raise BenchError(f"broker sent ERROR to a publisher: {frame.message!r}")
        raise BenchError("the broker sent data to a publish-only connection")

    def close(self, *, reset: bool = True) -> None:
        """Close; with ``reset`` by RST (only when nothing sent may be still unread)."""
        if reset:
            with contextlib.suppress(OSError):
                set_linger_reset(self.sock)
        self.sock.close()


SETUP_PREFIX = b"setup:"


@dataclass(frozen=True, slots=True)
class Target:
    """The broker under test and the key the benchmark uses on it."""

    host: str = "127.0.0.1"
    port: int = 10000
    ident: bytes = b"bench"
    secret: bytes = b"bench"
    channel: bytes = b"bench"
    tls: bool = False
    tls_ca: str | None = None
    tls_version: str | None = None  # "1.2" or "1.3" only; None: the highest both speak
    # Subscribers on another node of a cluster (cross-node figures); None: same broker.
    sub_port: int | None = None
    # The first subscriber's key (e.g. a durable one); None: ``ident``/``secret``.
    sub_ident: bytes | None = None
    sub_secret: bytes | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        return client_tls_context(self.tls_ca, self.tls_version) if self.tls else None

    def client(self, timeout: float = 10.0) -> Client:
        return Client.connect(self.host, self.port, self.ident, self.secret, tls=self.tls_context(), timeout=timeout)

    def sub_client(self, timeout: float = 10.0, index: int = 0) -> Client:
        """Subscriber ``index``'s connection: to ``sub_port`` when set; the first
        (``index`` 0) authenticates as ``sub_ident`` when set."""
        port = self.sub_port or self.port
        ident, secret = self.ident, self.secret
        if index == 0 and self.sub_ident is not None:
            ident = self.sub_ident
            secret = self.sub_secret if self.sub_secret is not None else self.sub_ident
        return Client.connect(self.host, port, ident, secret, tls=self.tls_context(), timeout=timeout)

    def slot_channel(self, i: int) -> bytes:
        """``bench-0`` .. ``bench-49``: one channel per concurrent handshake."""
        return self.channel + b"-" + str(i).encode()
