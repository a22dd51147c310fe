"""Channel name ↔ NATS subject, reversibly.

hpfeeds channel names may hold anything (``.``, ``*``, ``>``, spaces, any
UTF-8, even invalid UTF-8); a NATS subject token may not hold ``.``, ``*``,
``>`` or white space. Each channel becomes exactly one token after the prefix:
bytes outside ``[A-Za-z0-9_-]`` are percent-escaped (``%2E`` for ``.``), so
``cowrie.sessions`` → ``hpfeeds.cowrie%2Esessions`` and the mapping is a
bijection.
"""

from __future__ import annotations

import re

PREFIX = "hpfeeds."
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPE = {b: (chr(b) if b in _SAFE else f"%{b:02X}") for b in range(256)}
_TOKEN = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+")


def channel_to_subject(channel: bytes, prefix: str = PREFIX) -> str:
    if not channel:
        raise ValueError("empty channel")
    return prefix + "".join(_ESCAPE[b] for b in channel)


def subject_to_channel(subject: str, prefix: str = PREFIX) -> bytes:
    if not subject.startswith(prefix):
        raise ValueError(f"subject {subject!r} is not under {prefix!r}")
    token = subject[len(prefix) :]
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"subject {subject!r} is not an escaped channel")
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "%":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(token[i]))
            i += 1
    return bytes(out)
