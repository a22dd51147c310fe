"""A command run at a real pseudo-terminal, as a person runs it: the terminal
is its controlling terminal and stdin, so Ctrl-C typed there (``\\x03``) is
SIGINT from the line discipline, Ctrl-D (``\\x04``) is end of input, and echo
is whatever the command set on the terminal.

Every read has a deadline; ``close`` kills the command if it is still running
and closes both ends of the terminal.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence

CTRL_C = b"\x03"
CTRL_D = b"\x04"


def _take_terminal() -> None:
    # In the child, after setsid (start_new_session): stdin becomes the
    # controlling terminal, and this process group its foreground group.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """``argv`` with stdin and stdout at a new pseudo-terminal; stderr to a pipe."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        self.master, slave = os.openpty()
        self.screen = b""  # everything the terminal showed (echo and stdout)
        self.stderr = b""
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=slave,
                stdout=slave,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_take_terminal,  # an ioctl only, before exec
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        finally:
            os.close(slave)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """What the terminal showed, once it holds ``needle``."""
        return self._until(self.master, "screen", needle, timeout)

    def stderr_until(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """What the command wrote to stderr, once it holds ``needle``."""
        assert self.proc.stderr is not None
        return self._until(self.proc.stderr.fileno(), "stderr", needle, timeout)

    def _until(self, fd: int, name: str, needle: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in getattr(self, name):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{needle!r} not in {name} after {timeout} s: {getattr(self, name)!r}"
            if select.select([fd], [], [], remaining)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the command closed its side of the terminal
                    chunk = b""
                assert chunk, f"{needle!r} never in {name}: {getattr(self, name)!r}"
                setattr(self, name, getattr(self, name) + chunk)
        return bytes(getattr(self, name))

    def wait(self, timeout: float) -> tuple[int | None, str]:
        """The exit status (``None`` if still running after ``timeout``) and all of stderr."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None, ""
        assert self.proc.stderr is not None
        self.stderr += self.proc.stderr.read()
        return self.proc.returncode, self.stderr.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        os.close(self.master)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
