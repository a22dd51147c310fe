"""The reference hpfeeds (PyPI ``hpfeeds`` 3.1.0) and broker processes for tests.

The reference package's console scripts (``hpfeeds``, ``hpfeeds-broker``)
collide with ours, so it lives in a virtual environment of its own, created
once per machine in a cache directory outside the checkout and reused by every
test run. Everything here binds 127.0.0.1 only, every wait is bounded, and
every process started is stopped by its owner (``Broker.stop``, a ``with``
block, or ``stopping(popen)``). Ports, waiting for a port and auth files come
from ``tests.support.broker`` and are re-exported here.

The API, kept small because several suites import it:

- ``ensure_reference_venv() -> Path``: the reference virtualenv (created on
  first use; safe when test processes race: an ``fcntl`` lock serialises them).
- ``Broker``: a broker subprocess of either implementation on a fixed
  127.0.0.1 port that can be killed and started again on that port (for
  reconnect tests); ``reference_broker(...)`` and ``our_broker(...)`` build
  one from a users dict (``{ident: {secret, pubchans, subchans[, owner]}}``,
  the JSON auth format both brokers read).
- ``run_reference_cli(args)`` and ``run_reference_python(code)``: the
  reference ``hpfeeds`` command and a Python snippet using its clients
  (``hpfeeds.new(host, port, ident, secret)``, ``hpfeeds.asyncio.ClientSession``);
  ``popen_reference_cli`` for a long-running ``hpfeeds subscribe``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tests.support.broker import BROKER_BIN, free_port, wait_for_port, write_users_json

REFERENCE_REQUIREMENT = "hpfeeds[broker]==3.1.0"
HOST = "127.0.0.1"

#: Creating the venv downloads a few wheels; beyond this something is wrong.
VENV_CREATE_TIMEOUT_S = 600.0
#: A broker that does not accept connections within this is reported as failed.
BROKER_START_TIMEOUT_S = 20.0
#: SIGTERM, then SIGKILL after this.
STOP_GRACE_S = 5.0

_READY_MARKER = ".hpfeeds3-tests-ready"


def cache_dir() -> pathlib.Path:
    """``${XDG_CACHE_HOME:-~/.cache}/hpfeeds3-tests``; outside any checkout."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "hpfeeds3-tests"


def ensure_reference_venv() -> pathlib.Path:
    """Return the virtualenv holding ``hpfeeds[broker]==3.1.0``, creating it once.

    Its interpreter is a Python 3.10 or 3.9 when one is found (see
    ``reference_python``), else this one. Concurrent callers (two test runs,
    xdist workers) serialise on a lock file; a half-built venv (no ready
    marker) is removed and rebuilt.
    """
    python, minor = reference_python()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"reference-venv-py3.{minor}"
    marker = venv / _READY_MARKER
    if _ready(marker):
        return venv
    with open(root / "reference-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _ready(marker):
                return venv
            if venv.exists():
                shutil.rmtree(venv)
            deadline = time.monotonic() + VENV_CREATE_TIMEOUT_S
            subprocess.run(
                [python, "-m", "venv", str(venv)], check=True, timeout=VENV_CREATE_TIMEOUT_S, capture_output=True
            )
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", REFERENCE_REQUIREMENT],
                check=True,
                timeout=max(1.0, deadline - time.monotonic()),
                capture_output=True,
            )
            marker.write_text(REFERENCE_REQUIREMENT + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return venv


def _ready(marker: pathlib.Path) -> bool:
    try:
        return marker.read_text().strip() == REFERENCE_REQUIREMENT
    except OSError:
        return False


@functools.cache
def reference_python() -> tuple[str, int]:
    """The interpreter for the reference venv and its minor version (3.x).

    The reference broker's TLS reaches into asyncio internals that Python
    3.11 rewrote: on 3.11+ every TLS AUTH fails with an ``AttributeError``. So
    a 3.10 or 3.9 is preferred (``$HPFEEDS3_REFERENCE_PYTHON``, then
    ``python3.10``/``python3.9`` on PATH or under pyenv); without one, TLS
    tests against the reference are skipped (``reference_tls_works``).
    """
    candidates: list[str] = []
    if os.environ.get("HPFEEDS3_REFERENCE_PYTHON"):
        candidates.append(os.environ["HPFEEDS3_REFERENCE_PYTHON"])
    for minor in (10, 9):
        found = shutil.which(f"python3.{minor}")
        if found:
            candidates.append(found)
        pattern = os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")
        candidates += sorted(glob.glob(pattern), reverse=True)
    for candidate in candidates:
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, ssl, venv; print(sys.version_info[1])"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and 9 <= int(probe.stdout) <= 10:
            return candidate, int(probe.stdout)
    return sys.executable, sys.version_info[1]


def reference_tls_works() -> bool:
    """False when the reference venv runs on Python 3.11+, where its broker's TLS is broken."""
    return reference_python()[1] <= 10


# Ports and auth files as the rest of the suite makes them.
__all__ = [
    "Broker",
    "ensure_reference_venv",
    "free_port",
    "our_broker",
    "popen_reference_cli",
    "reference_broker",
    "reference_python",
    "reference_tls_works",
    "run_reference_cli",
    "run_reference_python",
    "stopping",
    "wait_for_port",
    "write_users_json",
]


# --- broker processes ----------------------------------------------------------


class Broker:
    """A broker subprocess listening on ``HOST:port``; ``start``/``stop``/``kill``
    may be repeated (the port stays the same, so clients can reconnect).

    Output goes to ``log_path`` (``log()``), never to a pipe that could fill up
    and stall the broker. ``ready_text``: a line the broker logs once it
    serves, waited for after the port accepts. Use as a context manager or
    call ``stop()`` in a finalizer.
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        log_path: pathlib.Path,
        *,
        kind: str,
        tls_ca: pathlib.Path | None = None,
        ready_text: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.host = HOST
        self.kind = kind
        self.tls_ca = tls_ca
        self.log_path = log_path
        self._ready_text = ready_text
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def start(self, timeout_s: float = BROKER_START_TIMEOUT_S) -> Broker:
        """Start (again) and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("broker already running")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            wait_for_port(self.port, timeout=timeout_s, proc=self.proc)
            deadline = time.monotonic() + timeout_s
            while self._ready_text is not None and self._ready_text not in self.log()[offset:]:
                if time.monotonic() >= deadline or self.proc.poll() is not None:
                    raise TimeoutError(f"broker never logged {self._ready_text!r}")
                time.sleep(0.02)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"{self.kind} broker did not start: {exc}\n{self.log()[-3000:]}") from None
        return self

    def kill(self) -> None:
        """SIGKILL, as in a crash: clients see their connections drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_GRACE_S)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_GRACE_S``. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_GRACE_S)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


Users = Mapping[str, Mapping[str, Any]]
TlsFiles = tuple[pathlib.Path, pathlib.Path, pathlib.Path]  # cert chain, key, CA that issued it


def reference_broker(workdir: pathlib.Path, users: Users, tls: TlsFiles | None = None) -> Broker:
    """The reference broker with ``users`` on a free port (not started yet).

    ``--exporter`` is always given: without it the reference binds its metrics
    server to 0.0.0.0:8080. Its JSON auth needs the file to exist at start.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    auth = write_users_json(workdir / "reference-users.json", dict(users))
    port = free_port()
    argv = [
        str(ensure_reference_venv() / "bin" / "hpfeeds-broker"),
        "--bind",
        f"{HOST}:{port}",
        "--auth",
        str(auth),
        "--exporter",
        f"{HOST}:{free_port()}",
        "--name",
        "reference",
    ]
    if tls is not None:
        argv += ["--tlscert", str(tls[0]), "--tlskey", str(tls[1])]
    return Broker(argv, port, workdir / "reference-broker.log", kind="reference", tls_ca=tls[2] if tls else None)


def our_broker(workdir: pathlib.Path, users: Users, tls: TlsFiles | None = None, *extra: str) -> Broker:
    """Our ``hpfeeds-broker`` (beside this interpreter) with ``users`` on a free port (not started yet)."""
    workdir.mkdir(parents=True, exist_ok=True)
    auth = write_users_json(workdir / "hpfeeds3-users.json", dict(users))
    port = free_port()
    argv = [BROKER_BIN, "--bind", f"{HOST}:{port}", "--auth", str(auth), "--name", "hpfeeds3", *extra]
    if tls is not None:
        argv += ["--tlscert", str(tls[0]), "--tlskey", str(tls[1])]
    return Broker(
        argv,
        port,
        workdir / "hpfeeds3-broker.log",
        kind="hpfeeds3",
        tls_ca=tls[2] if tls else None,
        ready_text="serving",
    )


# --- the reference clients -------------------------------------------------------


def run_reference_cli(
    args: Sequence[str], input: bytes | None = None, timeout_s: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run the reference ``hpfeeds`` command (output captured, never raises on exit code)."""
    exe = ensure_reference_venv() / "bin" / "hpfeeds"
    return subprocess.run([str(exe), *args], input=input, capture_output=True, timeout=timeout_s, check=False)


def popen_reference_cli(args: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start the reference ``hpfeeds`` command (e.g. ``subscribe``); the caller stops it."""
    exe = ensure_reference_venv() / "bin" / "hpfeeds"
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def run_reference_python(
    code: str, args: Sequence[str] = (), input: bytes | None = None, timeout_s: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` with the reference venv's interpreter (``sys.argv[1:] == args``)."""
    exe = ensure_reference_venv() / "bin" / "python"
    return subprocess.run(
        [str(exe), "-c", code, *args], input=input, capture_output=True, timeout=timeout_s, check=False
    )


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[bytes], timeout_s: float = STOP_GRACE_S) -> Iterator[subprocess.Popen[bytes]]:
    """Ensure a client subprocess is gone when the block ends (SIGTERM, then SIGKILL)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
