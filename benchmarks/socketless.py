"""What the in-process benchmarks share: a transport with no socket, and whether
callgrind can count.

``handshake_instructions.py`` and ``durable_instructions.py`` drive a running
broker's ``Connection`` objects in its own process: the broker's code runs as
it does for a client, and neither the kernel nor a load generator is in
the figures.
"""

from __future__ import annotations

import shutil
from typing import Any


class Transport:
    """An ``asyncio.Transport`` with no socket: it keeps the first and the last
    write and counts the bytes and writes; it closes when told."""

    __slots__ = ("closing", "first", "last", "peer", "writes", "written")

    def __init__(self, host: str, port: int) -> None:
        self.peer = (host, port)
        self.first = self.last = b""
        self.writes = self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | memoryview) -> None:
        if not self.writes:
            self.first = bytes(data)
        self.last = data  # type: ignore[assignment]  # (a view is kept as it is: no copy)
        self.writes += 1
        self.written += len(data)

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.write(piece)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def callgrind_available(no_callgrind: bool) -> bool:
    """Whether to count under callgrind: asked for, and valgrind installed (else says so)."""
    if no_callgrind:
        return False
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: no instruction count (apt install valgrind)")
        return False
    return True
