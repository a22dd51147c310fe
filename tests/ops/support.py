"""Shared by the operations tests: a broker as a subprocess, a raw hpfeeds client,
HTTP GETs, and the metric names a PromQL expression uses.

Everything binds 127.0.0.1 only, every wait has a deadline, and every process
started here is stopped by the fixture or context manager that started it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from hpfeeds3.protocol import Frame, Info
from tests.support.broker import RawClient as SharedRawClient

REPO = Path(__file__).resolve().parents[2]
BROKER = Path(sys.executable).parent / "hpfeeds-broker"
PYTHON = sys.executable

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0  # above the broker's 10 s shutdown drain


def copy_checkout(target: Path) -> Path:
    """Copy the checkout's files (tracked and new, as in the working tree; no venv, no caches) to ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        name = raw.decode()
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class RawClient(SharedRawClient):
    """The suite's raw-socket client, with the names these tests use."""

    def __init__(self, port: int, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
        super().__init__(port, tls=ssl_context, timeout=timeout)

    def read_frame(self) -> Frame | None:
        """The next frame, or ``None`` when the broker closed the connection."""
        try:
            return self.next_frame()
        except ConnectionError:
            return None

    def authenticate(self, ident: str, secret: str) -> Info:
        self.auth(ident, secret)
        assert self.info is not None
        return self.info


class BrokerProcess:
    """A broker started from an argv, in a working directory, with an environment."""

    def __init__(
        self, argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None, *, new_session: bool = False
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.log_path = cwd / "broker.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("HPFEEDS_")}
        base.update(env or {})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=base,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,  # its own process group, as a shell job or a systemd unit
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        """The log once it holds ``needle`` (lines are written by the broker's log thread, a moment later)."""
        deadline = time.monotonic() + timeout
        while needle not in (text := self.log()):
            assert time.monotonic() < deadline, f"{needle!r} not in the broker log after {timeout} s:\n{text[-3000:]}"
            time.sleep(0.02)
        return text

    def wait_ready(
        self, port: int, *, ssl_context: ssl.SSLContext | None = None, exporter_port: int | None = None
    ) -> None:
        """Until a client gets INFO on ``port`` and, with an exporter, ``/healthz``
        answers 200 (listeners open before the exporter and "serving" state)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}: {self.argv}\n{self.log()}")
            try:
                with RawClient(port, ssl_context=ssl_context, timeout=2.0) as client:
                    client.read_info()
                if exporter_port is None:
                    return
                status, body = http_get(f"http://127.0.0.1:{exporter_port}/healthz", timeout=2.0)
                if status == 200:
                    return
                last = (status, body)
            except (OSError, AssertionError) as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"broker not serving on {port} after {START_TIMEOUT_S} s ({last}):\n{self.log()}")

    def kill_group(self) -> None:
        """SIGKILL to the broker's process group (``new_session``), if any of it is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(5)
        if not self._log.closed:
            self._log.close()

    def stop(self) -> int:
        """SIGTERM (what ``docker stop`` sends), then the exit status; killed if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self._log.close()
                raise AssertionError(f"broker ignored SIGTERM for {STOP_TIMEOUT_S} s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_broker(argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(argv, cwd, env)
    try:
        yield broker
    finally:
        if broker.proc.poll() is None:
            broker.proc.kill()
            broker.proc.wait(5)
        broker._log.close()


# --- PromQL -------------------------------------------------------------------

# Labels Prometheus attaches at scrape time; a broker's /metrics never has them.
TARGET_LABELS = frozenset({"instance", "job"})

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
)
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"")
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(?!\w)(\s*\()?")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by a PromQL expression or a Grafana
    ``label_values(metric, label)`` query."""
    m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*([a-zA-Z_]\w*)\s*\)\s*", expr)
    if m:
        return {m.group(1)}, {m.group(2)}
    labels: set[str] = set()
    for _, inner in _GROUPING.findall(expr):
        labels.update(x.strip() for x in inner.split(",") if x.strip())
    for inner in _SELECTOR.findall(expr):
        labels.update(_MATCHER.findall(inner))
    rest = _GROUPING.sub(" ", expr)
    rest = _SELECTOR.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # range and subquery durations
    rest = re.sub(r"\"(?:[^\"\\]|\\.)*\"", " ", rest)  # string literals
    metrics = {
        name
        for name, call in _IDENT.findall(rest)
        if not call and name not in _KEYWORDS and name.lower() not in ("inf", "nan")
    }
    return metrics, labels
