"""Client-chosen text made safe for ERROR frames and log lines.

Idents, channels, owners and peer-sent text are attacker-controlled: anything
that reaches a log line or an ERROR text goes through ``escape`` (text) or
``printable`` (bytes) first. Every character that is not printable — Unicode
categories C (controls, format characters such as U+200E, surrogates,
unassigned) and Z (line and paragraph separators, other spaces) except the
ASCII space — is written as a Python escape (``\\x85``, ``\\u2028``), so no
client can break a line, forge one for a tool that splits on Unicode line
breaks, or hide text from a reader. A backslash the client sent is written
twice (``\\\\``), so an ident typed as the four characters ``\\x00`` never
reads like an escaped NUL; invalid UTF-8 bytes are written ``\\xff``.
"""

from __future__ import annotations

# Longest client-chosen string quoted in one log line or ERROR text.
MAX_QUOTED_CHARS = 300


def _escape_char(c: str) -> str:
    code = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # an invalid byte, as decoded with surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """Client text: every non-printable character (categories C and Z but the space) and backslash escaped."""
    if text.isprintable() and "\\" not in text:  # the common case, decided in C
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape_char(c) for c in text)


def one_line(text: str) -> str:
    """A whole log line made safe: non-printable characters escaped, backslashes kept.

    For text that holds client text already passed through ``escape`` (whose
    backslashes must not be doubled again) or none at all."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def printable(value: bytes) -> str:
    """Client-chosen bytes as safe text: invalid UTF-8 and non-printable characters escaped, length capped."""
    # surrogateescape: each invalid byte becomes one lone surrogate, which
    # escape() writes as \xNN (a backslash the client sent is doubled).
    return escape(value.decode("utf-8", "surrogateescape")[:MAX_QUOTED_CHARS])


def quoted(value: bytes) -> str:
    """``printable(value)`` in single quotes, for naming an ident or channel in a sentence."""
    return f"'{printable(value)}'"
