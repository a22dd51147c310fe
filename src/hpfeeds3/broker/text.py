"""Client-chosen text made safe for ERROR frames and log lines.

Idents, channels and owners are attacker-controlled bytes: anything that
reaches a log line or an ERROR text goes through ``printable`` first.
"""

from __future__ import annotations

# Longest client-chosen string quoted in one log line or ERROR text.
MAX_QUOTED_CHARS = 300


def printable(value: bytes) -> str:
    """Client-chosen bytes made safe for logs and ERROR texts."""
    return value.decode("utf-8", "backslashreplace")[:MAX_QUOTED_CHARS]
