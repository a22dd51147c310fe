"""Sans-I/O codec: encoders for every opcode and an incremental ``Decoder``.

Contract (as h11's): any byte string fed to a ``Decoder`` either yields frames
or raises ``ProtocolError``; nothing else. A frame's declared length is checked
against its opcode's cap on the 5-byte header, so a hostile length is refused
before a single body byte is buffered.

Identifiers and channel names are ``bytes`` here: the broker compares them as
bytes on its hot path; clients decode them at their edge.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import FrameTooLarge, MalformedFrame, ProtocolError, UnexpectedOpcode
from .frames import (
    BROKER_TO_CLIENT,
    CLIENT_TO_BROKER,
    DEFAULT_LIMITS,
    DIGEST_LEN,
    HEADER,
    HEADER_LEN,
    NONCE_LEN,
    OP_AUTH,
    OP_ERROR,
    OP_INFO,
    OP_PUBLISH,
    OP_SUBSCRIBE,
    OP_UNSUBSCRIBE,
    STR8_MAX,
    FrameLimits,
)


class _Op:
    """The opcodes as plain ints, for ``parse_body``'s value patterns: reading an
    ``Opcode`` member off its class goes through the enum metaclass's
    ``__getattr__`` hook (about a thousand instructions), a plain class attribute does not."""

    ERROR = OP_ERROR
    INFO = OP_INFO
    AUTH = OP_AUTH
    PUBLISH = OP_PUBLISH
    SUBSCRIBE = OP_SUBSCRIBE
    UNSUBSCRIBE = OP_UNSUBSCRIBE


_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
# Builds a NamedTuple without the Python-level __new__ call (hot loop only).
_new = tuple.__new__


# --- frames as values ------------------------------------------------------


class Error(NamedTuple):
    message: str


class Info(NamedTuple):
    name: bytes
    nonce: bytes


class Auth(NamedTuple):
    ident: bytes
    digest: bytes


class Publish(NamedTuple):
    ident: bytes
    channel: bytes
    payload: bytes


class Subscribe(NamedTuple):
    ident: bytes
    channel: bytes


class Unsubscribe(NamedTuple):
    ident: bytes
    channel: bytes


Frame = Error | Info | Auth | Publish | Subscribe | Unsubscribe


# --- encoders ----------------------------------------------------------------


def _str8(value: bytes, what: str) -> bytes:
    if len(value) > STR8_MAX:
        raise ValueError(f"{what} is {len(value)} bytes; at most {STR8_MAX} fit in the protocol")
    return bytes((len(value),)) + value


def _frame(opcode: int, body: bytes) -> bytes:
    return _pack_header(HEADER_LEN + len(body), opcode) + body


def encode_error(message: str) -> bytes:
    return _frame(OP_ERROR, message.encode("utf-8", "replace"))


def encode_info(name: bytes, nonce: bytes) -> bytes:
    return _frame(OP_INFO, _str8(name, "broker name") + nonce)


def info_head(name: bytes, nonce_len: int = NONCE_LEN) -> bytes:
    """An INFO frame up to its nonce: ``info_head(name) + nonce == encode_info(name, nonce)``
    for every nonce of ``nonce_len`` bytes (a broker greets each connection with one)."""
    return encode_info(name, bytes(nonce_len))[:-nonce_len] if nonce_len else encode_info(name, b"")


def encode_auth(ident: bytes, digest: bytes) -> bytes:
    if len(digest) != DIGEST_LEN:
        raise ValueError("AUTH digest must be 20 bytes (SHA-1)")
    return _frame(OP_AUTH, _str8(ident, "ident") + digest)


def encode_publish(ident: bytes, channel: bytes, payload: bytes) -> bytes:
    return _frame(OP_PUBLISH, _str8(ident, "ident") + _str8(channel, "channel") + payload)


def encode_subscribe(ident: bytes, channel: bytes) -> bytes:
    _str8(channel, "channel")
    return _frame(OP_SUBSCRIBE, _str8(ident, "ident") + channel)


def encode_unsubscribe(ident: bytes, channel: bytes) -> bytes:
    _str8(channel, "channel")
    return _frame(OP_UNSUBSCRIBE, _str8(ident, "ident") + channel)


def encode(frame: Frame) -> bytes:
    """Encode any frame value (the inverse of ``Decoder.feed``)."""
    if isinstance(frame, Publish):
        return encode_publish(frame.ident, frame.channel, frame.payload)
    if isinstance(frame, Subscribe):
        return encode_subscribe(frame.ident, frame.channel)
    if isinstance(frame, Unsubscribe):
        return encode_unsubscribe(frame.ident, frame.channel)
    if isinstance(frame, Auth):
        return encode_auth(frame.ident, frame.digest)
    if isinstance(frame, Info):
        return encode_info(frame.name, frame.nonce)
    return encode_error(frame.message)


# --- body parsers (offsets into one buffer; no intermediate copies) -----------


def _read_str8(buf: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    if pos >= end:
        raise MalformedFrame(f"{what} missing")
    n = buf[pos]
    pos += 1
    if pos + n > end:
        raise MalformedFrame(f"{what} runs past the end of the frame")
    if n == 0:
        raise MalformedFrame(f"{what} is empty")
    return buf[pos : pos + n], pos + n


def parse_body(opcode: int, buf: bytes, start: int, end: int) -> Frame:
    """Parse the body ``buf[start:end]`` of a frame whose header was accepted: the one
    ``match`` over opcodes (which a side may receive is the decoder's ``accept``)."""
    match opcode:
        case _Op.PUBLISH:
            ident, pos = _read_str8(buf, start, end, "ident")
            channel, pos = _read_str8(buf, pos, end, "channel")
            return Publish(ident, channel, buf[pos:end])
        case _Op.SUBSCRIBE | _Op.UNSUBSCRIBE:
            ident, pos = _read_str8(buf, start, end, "ident")
            if pos >= end:
                raise MalformedFrame("channel is empty")
            channel = buf[pos:end]
            return Subscribe(ident, channel) if opcode == OP_SUBSCRIBE else Unsubscribe(ident, channel)
        case _Op.AUTH:
            ident, pos = _read_str8(buf, start, end, "ident")
            if end - pos != DIGEST_LEN:
                raise MalformedFrame(f"AUTH digest is {end - pos} bytes, not {DIGEST_LEN}")
            return Auth(ident, buf[pos:end])
        case _Op.INFO:
            if start >= end:
                raise MalformedFrame("broker name missing")
            n = buf[start]
            if start + 1 + n > end:
                raise MalformedFrame("broker name runs past the end of the frame")
            return Info(buf[start + 1 : start + 1 + n], buf[start + 1 + n : end])
        case _Op.ERROR:
            return Error(buf[start:end].decode("utf-8", "replace"))
        case _:
            raise UnexpectedOpcode(opcode)


def check_header(length: int, opcode: int, max_len: tuple[int, ...]) -> None:
    """Refuse a header before its body is buffered (``max_len`` from ``FrameLimits.table``)."""
    cap = max_len[opcode]
    if cap == 0:
        raise UnexpectedOpcode(opcode)
    if length < HEADER_LEN:
        raise MalformedFrame(f"declared length {length} is shorter than the {HEADER_LEN}-byte header")
    if length > cap:
        raise FrameTooLarge(opcode, length, cap)


class PublishRun(NamedTuple):
    """Consecutive PUBLISH frames of one ident to one channel, as received.

    ``data`` is the frames' bytes unchanged: exactly what a subscriber is sent.
    For the size histogram: every payload is ``payload_len`` bytes long, unless
    ``payload_lens`` lists each frame's payload length (when they differ).
    """

    ident: bytes
    channel: bytes
    data: bytes
    frames: int  # how many PUBLISH frames ``data`` holds
    payload_len: int
    payload_lens: list[int] | None


Item = Frame | PublishRun


class Decoder:
    """Incremental decoder: bytes in, frames (or runs of PUBLISH frames) out.

    ``receive(data)`` buffers a read; ``next_item()`` returns the next complete
    frame, or ``None`` until more bytes arrive; ``feed(data)`` does both and
    returns every complete item. Callers that must bound the work of one turn
    (the broker) pull items one at a time and stop when their budget is spent;
    what they leave stays buffered.

    Costs, whatever the read sizes:

    - Buffering is linear in the bytes received: reads that complete no frame
      are kept as a list of chunks and joined once, when the frame they belong
      to is complete (a 1 MiB frame trickled in 128-byte reads costs one join,
      not 8,192 growing copies). A read of whole frames is never copied.
    - A frame's header is checked against its opcode's cap (``accepted`` and
      ``limits``) before its body is buffered: past the header, a waiting
      decoder does O(1) work per read.

    With ``runs=True`` (the broker), consecutive PUBLISH frames with the same
    ident and channel come out as one ``PublishRun`` whose ``data`` is their
    bytes, unchanged (the whole read when it is one run): the broker checks a
    run once and forwards it with one write per subscriber. Otherwise every
    PUBLISH is a ``Publish`` frame.
    """

    __slots__ = ("_buf", "_have", "_limits", "_max_len", "_need", "_parts", "_pos", "_runs")

    def __init__(
        self,
        accepted: frozenset[int] = BROKER_TO_CLIENT,
        limits: FrameLimits = DEFAULT_LIMITS,
        *,
        runs: bool = False,
    ) -> None:
        self._limits = limits
        self._max_len = limits.table(accepted)
        self._runs = runs
        self._buf = b""  # the read being parsed (or the joined chunks of a frame)
        self._pos = 0  # first unconsumed byte of _buf
        # Reads received behind _buf, not joined yet; () until there is one (an empty
        # list on every idle connection is 56 bytes).
        self._parts: list[bytes] | tuple[()] = ()
        self._have = 0  # unconsumed bytes: len(_buf) - _pos + sum of _parts
        self._need = HEADER_LEN  # bytes the next item needs before it can be parsed

    @classmethod
    def for_broker(cls, limits: FrameLimits = DEFAULT_LIMITS, *, runs: bool = False) -> Decoder:
        return cls(CLIENT_TO_BROKER, limits, runs=runs)

    @classmethod
    def for_client(cls, limits: FrameLimits = DEFAULT_LIMITS) -> Decoder:
        return cls(BROKER_TO_CLIENT, limits)

    def accept(self, accepted: frozenset[int]) -> None:
        """From now on, accept only these opcodes (e.g. AUTH alone before authentication)."""
        self._max_len = self._limits.table(accepted)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as items."""
        return self._have

    @property
    def pending_frame_bytes(self) -> int:
        """Declared length of the frame whose header has arrived and body has not (else 0)."""
        return self._need if self._need > HEADER_LEN else 0

    def receive(self, data: bytes) -> None:
        if not data:
            return
        if self._have:
            parts = self._parts
            if isinstance(parts, list):
                parts.append(data)
            else:
                self._parts = [data]
        else:
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        self._have += len(data)

    def feed(self, data: bytes) -> list[Item]:
        """``receive(data)``, then every complete item."""
        self.receive(data)
        items: list[Item] = []
        while (item := self.next_item()) is not None:
            items.append(item)
        return items

    def next_item(self) -> Item | None:
        """The next complete frame or run, or ``None``; raises ``ProtocolError`` only."""
        if self._have < self._need:
            if self._pos:
                # Keep only the unconsumed tail, not the whole read it came in.
                self._buf = self._buf[self._pos :]
                self._pos = 0
            return None
        if self._parts:
            self._buf = b"".join([memoryview(self._buf)[self._pos :], *self._parts])
            self._parts = ()
            self._pos = 0
        buf = self._buf
        pos = self._pos
        end = len(buf)
        max_len = self._max_len
        item: Item
        try:
            length, opcode = _unpack_header(buf, pos)
            if not HEADER_LEN <= length <= max_len[opcode]:
                check_header(length, opcode, max_len)  # raises the precise error
            frame_end = pos + length
            if frame_end > end:
                self._need = length
                return self.next_item()  # compacts and waits
            # Every frame a broker receives starts with a str8 ident.
            i = pos + HEADER_LEN + 1
            n = buf[i - 1] if i <= frame_end else 0
            if opcode != OP_PUBLISH:
                # AUTH and SUBSCRIBE well formed, inline (every connection sends them);
                # any other frame, and a malformed one, through parse_body.
                c = i + n
                if opcode == OP_AUTH and n and frame_end - c == DIGEST_LEN:
                    item = _new(Auth, (buf[i:c], buf[c:frame_end]))
                elif opcode == OP_SUBSCRIBE and n and c < frame_end:
                    item = _new(Subscribe, (buf[i:c], buf[c:frame_end]))
                else:
                    item = parse_body(opcode, buf, pos + HEADER_LEN, frame_end)
                pos = frame_end
            else:
                # PUBLISH inline (the bulk of any stream): str8 ident, str8 channel, payload.
                c = i + n + 1
                m = buf[c - 1] if c <= frame_end else 0
                if not n or not m or c + m > frame_end:
                    parse_body(opcode, buf, pos + HEADER_LEN, frame_end)  # raises the precise error
                if not self._runs:
                    item = _new(Publish, (buf[i : i + n], buf[c : c + m], buf[c + m : frame_end]))
                    pos = frame_end
                elif frame_end == end:  # the read ends with this frame: a run of one
                    data = buf if pos == 0 else buf[pos:end]
                    item = _new(PublishRun, (buf[i : i + n], buf[c : c + m], data, 1, end - c - m, None))
                    pos = end
                else:
                    item, pos = self._run(buf, pos, end, frame_end, i, n, c, m)
        except ProtocolError:
            self.clear()
            raise
        # Consumed up to pos.
        self._need = HEADER_LEN
        if pos == end:
            self._buf = b""
            self._pos = 0
            self._have = 0
        else:
            self._pos = pos
            self._have = end - pos
        return item

    def _run(
        self, buf: bytes, pos: int, end: int, frame_end: int, i: int, n: int, c: int, m: int
    ) -> tuple[PublishRun, int]:
        """The PUBLISH at ``pos`` (ident ``buf[i:i+n]``, channel ``buf[c:c+m]``) and the following
        frames that start with the same str8 ident + str8 channel, and where they end.

        Per extra frame: a header, a prefix compare and a length compare; a frame
        that does not fit ends the run and is checked fully by the next call."""
        length = frame_end - pos
        overhead = c + m - pos
        prefix = buf[pos + HEADER_LEN : c + m]
        payload_len = length - overhead
        payload_lens: list[int] | None = None
        start = pos
        count = 1
        pos = frame_end
        max_publish = self._max_len[OP_PUBLISH]
        # Per frame, as few new ints as may be (each is an allocation): the last
        # position a header fits at, and the first frame's length, computed once.
        last = end - HEADER_LEN
        first_length = length
        while pos <= last:
            length, opcode = _unpack_header(buf, pos)
            frame_end = pos + length
            # The prefix compared as a slice, which the length check keeps inside the
            # frame: bytes.startswith with bounds parses its arguments the slow way.
            if (
                opcode != OP_PUBLISH
                or not overhead <= length <= max_publish
                or frame_end > end
                or buf[pos + HEADER_LEN : pos + overhead] != prefix
            ):
                break
            if payload_lens is not None:
                payload_lens.append(length - overhead)
            elif length != first_length:
                payload_lens = [payload_len] * count
                payload_lens.append(length - overhead)
            count += 1
            pos = frame_end
        data = buf if start == 0 and pos == end else buf[start:pos]
        return _new(PublishRun, (buf[i : i + n], buf[c : c + m], data, count, payload_len, payload_lens)), pos

    def clear(self) -> None:
        """Drop every byte received and not yet returned (a closed connection's, or after an error)."""
        self._buf = b""
        self._pos = 0
        self._parts = ()
        self._have = 0
        self._need = HEADER_LEN
