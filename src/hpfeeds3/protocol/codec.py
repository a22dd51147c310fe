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
    OP_AUTH,
    OP_ERROR,
    OP_INFO,
    OP_PUBLISH,
    OP_SUBSCRIBE,
    OP_UNSUBSCRIBE,
    STR8_MAX,
    FrameLimits,
)

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
    """Parse the body ``buf[start:end]`` of a frame whose header was accepted."""
    if opcode == OP_PUBLISH:
        ident, pos = _read_str8(buf, start, end, "ident")
        channel, pos = _read_str8(buf, pos, end, "channel")
        return Publish(ident, channel, buf[pos:end])
    if opcode in (OP_SUBSCRIBE, OP_UNSUBSCRIBE):
        ident, pos = _read_str8(buf, start, end, "ident")
        if pos >= end:
            raise MalformedFrame("channel is empty")
        channel = buf[pos:end]
        return Subscribe(ident, channel) if opcode == OP_SUBSCRIBE else Unsubscribe(ident, channel)
    if opcode == OP_AUTH:
        ident, pos = _read_str8(buf, start, end, "ident")
        if end - pos != DIGEST_LEN:
            raise MalformedFrame(f"AUTH digest is {end - pos} bytes, not {DIGEST_LEN}")
        return Auth(ident, buf[pos:end])
    if opcode == OP_INFO:
        if start >= end:
            raise MalformedFrame("broker name missing")
        n = buf[start]
        if start + 1 + n > end:
            raise MalformedFrame("broker name runs past the end of the frame")
        return Info(buf[start + 1 : start + 1 + n], buf[start + 1 + n : end])
    if opcode == OP_ERROR:
        return Error(buf[start:end].decode("utf-8", "replace"))
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


class Decoder:
    """Incremental decoder: ``feed(bytes) -> list[Frame]``.

    ``accepted`` says which opcodes this side receives (``CLIENT_TO_BROKER`` for
    a broker, ``BROKER_TO_CLIENT`` for a client). Memory held is at most one
    frame's cap plus one read.
    """

    __slots__ = ("_buf", "_max_len")

    def __init__(
        self,
        accepted: frozenset[int] = BROKER_TO_CLIENT,
        limits: FrameLimits = DEFAULT_LIMITS,
    ) -> None:
        self._buf = b""
        self._max_len = limits.table(accepted)

    @classmethod
    def for_broker(cls, limits: FrameLimits = DEFAULT_LIMITS) -> Decoder:
        return cls(CLIENT_TO_BROKER, limits)

    @classmethod
    def for_client(cls, limits: FrameLimits = DEFAULT_LIMITS) -> Decoder:
        return cls(BROKER_TO_CLIENT, limits)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf + data if self._buf else bytes(data)
        end = len(buf)
        pos = 0
        frames: list[Frame] = []
        append = frames.append
        max_len = self._max_len
        try:
            while end - pos >= HEADER_LEN:
                length, opcode = _unpack_header(buf, pos)
                if not HEADER_LEN <= length <= max_len[opcode]:
                    check_header(length, opcode, max_len)  # raises the precise error
                frame_end = pos + length
                if frame_end > end:
                    break
                if opcode == OP_PUBLISH:
                    # PUBLISH inline (the bulk of any stream): str8 ident, str8 channel, payload.
                    i = pos + HEADER_LEN + 1
                    n = buf[i - 1] if i <= frame_end else 0
                    c = i + n + 1
                    m = buf[c - 1] if c <= frame_end else 0
                    if not n or not m or c + m > frame_end:
                        parse_body(opcode, buf, pos + HEADER_LEN, frame_end)  # raises the precise error
                    append(_new(Publish, (buf[i : i + n], buf[c : c + m], buf[c + m : frame_end])))
                elif opcode == OP_SUBSCRIBE or opcode == OP_UNSUBSCRIBE:  # noqa: SIM109 - two compares beat a tuple test here
                    i = pos + HEADER_LEN + 1
                    n = buf[i - 1] if i <= frame_end else 0
                    if not n or i + n >= frame_end:
                        parse_body(opcode, buf, pos + HEADER_LEN, frame_end)  # raises the precise error
                    kind = Subscribe if opcode == OP_SUBSCRIBE else Unsubscribe
                    append(_new(kind, (buf[i : i + n], buf[i + n : frame_end])))  # type: ignore[arg-type]
                else:
                    append(parse_body(opcode, buf, pos + HEADER_LEN, frame_end))
                pos = frame_end
        except ProtocolError:
            self._buf = b""
            raise
        # Drop consumed bytes once per feed, not once per frame.
        self._buf = buf[pos:] if pos else buf
        return frames
