"""Client-chosen text made safe for ERROR frames and log lines.

Idents, channels, owners and peer-sent text are attacker-controlled: anything
that reaches a log line or an ERROR text goes through ``escape`` (text) or
``printable`` (bytes) first. Every character that is not printable — Unicode
categories C (controls, format characters such as U+200E, surrogates,
unassigned) and Z (line and paragraph separators, other spaces) except the
ASCII space — is written as a Python escape (``\\x85``, ``\\u2028``), so no
client can break a line, forge one for a tool that splits on Unicode line
breaks, or hide text from a reader.
"""

from __future__ import annotations

# Longest client-chosen string quoted in one log line or ERROR text.
MAX_QUOTED_CHARS = 300


def _escape_char(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character (categories C and Z but the space) escaped."""
    if text.isprintable():  # the common case, decided in C
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def printable(value: bytes) -> str:
    """Client-chosen bytes as safe text: invalid UTF-8 and non-printable characters escaped, length capped."""
    return escape(value.decode("utf-8", "backslashreplace")[:MAX_QUOTED_CHARS])


def quoted(value: bytes) -> str:
    """``printable(value)`` in single quotes, for naming an ident or channel in a sentence."""
    return f"'{printable(value)}'"
