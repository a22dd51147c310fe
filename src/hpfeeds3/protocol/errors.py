"""The one exception family that malformed input can raise.

A ``ProtocolError`` means the *peer* broke the protocol: close that
connection. ``reason`` is a short stable token the broker maps to its close
reason; the message is for humans.
"""

from __future__ import annotations


class ProtocolError(Exception):
    reason = "bad_frame"


class FrameTooLarge(ProtocolError):
    """The header declared a length over the opcode's cap."""

    reason = "frame_too_large"

    def __init__(self, opcode: int, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes for opcode {opcode} exceeds the limit of {limit} bytes")
        self.opcode = opcode
        self.length = length
        self.limit = limit


class UnexpectedOpcode(ProtocolError):
    """Unknown opcode, or one this side never receives (a client sending INFO)."""

    reason = "bad_frame"

    def __init__(self, opcode: int) -> None:
        super().__init__(f"unexpected opcode {opcode}")
        self.opcode = opcode


class MalformedFrame(ProtocolError):
    """The body does not have the shape its opcode requires."""

    reason = "bad_frame"
