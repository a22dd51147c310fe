"""The reference hpfeeds (PyPI ``hpfeeds`` 3.1.0) and broker processes for tests.

The reference package's console scripts (``hpfeeds``, ``hpfeeds-broker``)
collide with ours, so it lives in a virtual environment of its own, created
once per machine in a cache directory outside the checkout and reused by every
test run. Everything here binds 127.0.0.1 only, every wait is bounded, and
every process started is stopped by its owner (``BrokerProcess.stop`` or the
``with`` block).

The API, kept small because several suites import it:

- ``ensure_reference_venv() -> Path``: the reference virtualenv (created on
  first use; safe when test processes race: an ``fcntl`` lock serialises them).
- ``free_port()``, ``wait_for_port(port)``: a port to bind, and waiting until
  something accepts on it.
- ``AccessKey`` and ``write_users_json(path, keys)``: an auth file in the JSON
  format both brokers read (``{ident: {owner, secret, pubchans, subchans}}``).
- ``start_broker(argv, port)``: run any broker command line until stopped;
  ``start_reference_broker(...)`` and ``start_our_broker(...)`` build the
  command lines.
- ``run_reference_cli(args)`` and ``run_reference_python(code)``: the
  reference ``hpfeeds`` command and a Python snippet using its clients
  (``hpfeeds.new(host, port, ident, secret)``, ``hpfeeds.asyncio.ClientSession``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

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

    Concurrent callers (pytest-xdist workers, two test runs) serialise on a
    lock file; a half-built venv (no ready marker) is removed and rebuilt.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / "reference-venv"
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
                [sys.executable, "-m", "venv", str(venv)],
                check=True,
                timeout=VENV_CREATE_TIMEOUT_S,
                capture_output=True,
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


# --- ports ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = HOST, timeout_s: float = BROKER_START_TIMEOUT_S) -> None:
    """Block until ``host:port`` accepts a TCP connection; ``TimeoutError`` if not in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepted on {host}:{port} within {timeout_s} s") from None
            time.sleep(0.02)


# --- auth files ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AccessKey:
    """One entry of a JSON auth file."""

    ident: str
    secret: str
    pubchans: Sequence[str] = ()
    subchans: Sequence[str] = ()
    owner: str = "tests"


def write_users_json(path: pathlib.Path, keys: Iterable[AccessKey]) -> pathlib.Path:
    """Write ``{ident: {owner, secret, pubchans, subchans}}`` to ``path``; return ``path``."""
    data = {
        k.ident: {"owner": k.owner, "secret": k.secret, "pubchans": list(k.pubchans), "subchans": list(k.subchans)}
        for k in keys
    }
    path.write_text(json.dumps(data, indent=2))
    return path


# --- broker processes ----------------------------------------------------------


class BrokerProcess:
    """A broker subprocess listening on ``HOST:port``; ``stop()`` is idempotent.

    Its stdout and stderr go to ``log_path`` so a failing test can show them
    (``log()``) without a pipe that could fill up and stall the broker.
    """

    def __init__(self, argv: Sequence[str], port: int, log_path: pathlib.Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.port = port
        self.host = HOST
        self.log_path = log_path
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = BROKER_START_TIMEOUT_S) -> BrokerProcess:
        """Start (or start again after ``stop``/``kill``) and wait until it accepts."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("broker already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                wait_for_port(self.port, timeout_s=0.2)
                return self
            except TimeoutError:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise TimeoutError(f"broker did not accept within {timeout_s} s:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL: the broker vanishes as in a crash; its clients see the connection drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_GRACE_S)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_GRACE_S``."""
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

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(argv: Sequence[str], port: int, log_path: pathlib.Path) -> BrokerProcess:
    """Start any broker command line that will listen on ``HOST:port``."""
    return BrokerProcess(argv, port, log_path).start()


def reference_broker_argv(
    venv: pathlib.Path,
    port: int,
    auth_json: pathlib.Path,
    exporter_port: int,
    tls: tuple[pathlib.Path, pathlib.Path] | None = None,
    name: str = "reference",
) -> list[str]:
    """The reference broker's command line. ``--exporter`` is always given: without
    it the reference binds its metrics server to 0.0.0.0:8080."""
    argv = [
        str(venv / "bin" / "hpfeeds-broker"),
        "--bind",
        f"{HOST}:{port}",
        "--auth",
        str(auth_json),
        "--exporter",
        f"{HOST}:{exporter_port}",
        "--name",
        name,
    ]
    if tls is not None:
        argv += ["--tlscert", str(tls[0]), "--tlskey", str(tls[1])]
    return argv


def our_broker_argv(
    port: int,
    auth_json: pathlib.Path,
    tls: tuple[pathlib.Path, pathlib.Path] | None = None,
    name: str = "hpfeeds3",
) -> list[str]:
    """Our broker's command line (the ``hpfeeds-broker`` beside this interpreter)."""
    argv = [
        str(pathlib.Path(sys.executable).parent / "hpfeeds-broker"),
        "--bind",
        f"{HOST}:{port}",
        "--auth",
        str(auth_json),
        "--name",
        name,
    ]
    if tls is not None:
        argv += ["--tlscert", str(tls[0]), "--tlskey", str(tls[1])]
    return argv


def start_reference_broker(
    workdir: pathlib.Path,
    keys: Iterable[AccessKey],
    tls: tuple[pathlib.Path, pathlib.Path] | None = None,
) -> BrokerProcess:
    """Write ``workdir/users.json`` and start the reference broker on a free port."""
    auth = write_users_json(workdir / "users.json", keys)
    port = free_port()
    argv = reference_broker_argv(ensure_reference_venv(), port, auth, free_port(), tls)
    return start_broker(argv, port, workdir / "reference-broker.log")


def start_our_broker(
    workdir: pathlib.Path,
    keys: Iterable[AccessKey],
    tls: tuple[pathlib.Path, pathlib.Path] | None = None,
) -> BrokerProcess:
    """Write ``workdir/users.json`` and start our broker on a free port."""
    auth = write_users_json(workdir / "users.json", keys)
    port = free_port()
    return start_broker(our_broker_argv(port, auth, tls), port, workdir / "hpfeeds3-broker.log")


def our_broker_available() -> bool:
    """True once ``hpfeeds3.broker.cli`` exists (the broker is being written)."""
    import importlib.util

    try:
        return importlib.util.find_spec("hpfeeds3.broker.cli") is not None
    except ImportError:
        return False


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
