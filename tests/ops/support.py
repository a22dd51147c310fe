"""Shared by the operations tests: a broker as a subprocess, a raw hpfeeds client,
HTTP GETs (all three from ``tests.support.broker``, with the names and
timeouts these tests use), and the metric names a PromQL expression uses.

Everything binds 127.0.0.1 only, every wait has a deadline, and every process
started here is stopped by the fixture or context manager that started it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from hpfeeds3.protocol import Frame, Info
from tests.support.broker import BrokerProcess as SharedBrokerProcess
from tests.support.broker import RawClient as SharedRawClient
from tests.support.broker import free_port as free_port
from tests.support.broker import http_get as http_get
from tests.support.broker import wait_healthy, wait_info

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


class BrokerProcess(SharedBrokerProcess):
    """A broker started from a whole command line, in a working directory, with an
    environment (the test runner's ``HPFEEDS_*`` variables left out)."""

    def __init__(
        self, argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None, *, new_session: bool = False
    ) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("HPFEEDS_")}
        super().__init__(
            argv, cwd, env, command=(), base_env=base, new_session=new_session, log_path=cwd / "broker.log"
        )

    def wait_ready(  # type: ignore[override]
        self, port: int, *, ssl_context: ssl.SSLContext | None = None, exporter_port: int | None = None
    ) -> None:
        """Until a client gets INFO on ``port`` and, with an exporter, ``/healthz``
        answers 200 (listeners open before the exporter and "serving" state)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            wait_info(port, tls=ssl_context, timeout=START_TIMEOUT_S, proc=self.proc)
            if exporter_port is not None:
                wait_healthy(exporter_port, max(0.1, deadline - time.monotonic()), self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"broker not serving on {port}: {self.argv} ({exc}):\n{self.log()}") from None

    def stop(self) -> int:  # type: ignore[override]
        """SIGTERM (what ``docker stop`` sends), then the exit status; killed if it hangs (and the test fails)."""
        return super().stop(timeout=STOP_TIMEOUT_S, must_obey=True)


@contextlib.contextmanager
def running_broker(argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> Iterator[BrokerProcess]:
    """``BrokerProcess`` (not waited for), killed when the block ends."""
    broker = BrokerProcess(argv, cwd, env)
    try:
        yield broker
    finally:
        broker.kill()


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
