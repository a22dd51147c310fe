"""Start our broker exactly as a user does (``hpfeeds-broker`` subprocess) and
talk to it with raw sockets.

The suite's one subprocess harness: ports (``free_port``, ``free_ports``),
waits (``wait_for_port``, ``wait_healthy``), ``http_get``, ``BrokerProcess``
(any command line; ``launch_broker`` picks the ports and waits until it
serves) and ``RawClient``. Metrics are read with ``tests.support.metrics``;
a broker inside the test process comes from ``tests.support.inprocess``.

Every process started here is stopped by its fixture; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, cast

from hpfeeds3.protocol import (
    Decoder,
    Error,
    Frame,
    Info,
    Publish,
    encode_auth,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
    sign,
)

BIN = Path(sys.executable).parent
BROKER_BIN = str(BIN / "hpfeeds-broker")


# Ports free_ports gave out lately in this process: random picks from one range
# would otherwise hand the same port out twice before the first broker binds it.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port for a listener, below the ephemeral range (see ``free_ports``): one
    the kernel gave out for a bind to port 0 is also what it hands the next outgoing connection."""
    return free_ports(1)


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports (``--workers`` exporters use PORT + i).

    Taken below the kernel's ephemeral range, so no outgoing connection on this
    busy machine takes PORT + i between this check and the broker's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    bottom, top = _worker_slice(max(1024, low - 12000), low)
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(bottom, top - n)
        wanted = range(first, first + n)
        if not _HANDED_OUT.isdisjoint(wanted):
            # Free now, but already given to a broker of this run that may not
            # have bound it yet (two picks in a row, e.g. --bind and --admin).
            continue
        with contextlib.ExitStack() as held:
            try:
                for i in range(n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", first + i))
            except OSError:
                continue
        _HANDED_OUT.update(wanted)
        if len(_HANDED_OUT) > 4096:  # a run's old picks are long bound or gone
            _HANDED_OUT.clear()
            _HANDED_OUT.update(wanted)
        return first
    raise RuntimeError(f"no {n} consecutive free ports")


def _worker_slice(bottom: int, top: int) -> tuple[int, int]:
    """This pytest-xdist worker's share of the ports ``bottom`` .. ``top``: the workers are
    separate processes, and two picking the same free port would each hand it out."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count <= 1:
        return bottom, top
    index = int(worker[2:])
    width = (top - bottom) // count
    return bottom + index * width, bottom + (index + 1) * width


def wait_for_port(
    port: int, host: str = "127.0.0.1", timeout: float = 10.0, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body), an error status included; raises only when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(exporter_port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Until the exporter's ``/healthz`` answers 200 (the broker is serving)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before /healthz answered 200")
        try:
            status, body = http_get(f"http://127.0.0.1:{exporter_port}/healthz", timeout=1)
            if status == 200:
                return
            last = (status, body)
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"exporter on {exporter_port} not healthy after {timeout} s ({last})")
        time.sleep(0.05)


def write_users_json(path: Path, users: Mapping[str, Mapping[str, Any]]) -> Path:
    """``users``: ident -> {secret, pubchans, subchans[, owner]} (the reference format)."""
    data = {
        ident: {
            "owner": u.get("owner", ident),
            "secret": u["secret"],
            "pubchans": list(u.get("pubchans", [])),
            "subchans": list(u.get("subchans", [])),
        }
        for ident, u in users.items()
    }
    path.write_text(json.dumps(data))
    return path


def sqlite_add_key(
    path: Path, ident: str, secret: str, pubchans: Sequence[str], subchans: Sequence[str], owner: str = "owner"
) -> None:
    """Insert a row as the spec's SQL does (the table is created by the broker or here)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "create table if not exists authkeys (id integer primary key autoincrement,"
            " owner TEXT, ident TEXT, secret TEXT, pubchans TEXT, subchans TEXT)"
        )
        conn.execute(
            "INSERT INTO authkeys (owner, ident, secret, pubchans, subchans) VALUES (?, ?, ?, ?, ?)",
            (owner, ident, secret, json.dumps(list(pubchans)), json.dumps(list(subchans))),
        )
    conn.close()


class BrokerProcess:
    """A running broker; its output goes to ``log_path``.

    ``args`` follow ``hpfeeds-broker`` (``command`` replaces that program, e.g.
    ``()`` when ``args`` is a whole command line such as ``bash -c ...``).
    ``port`` and ``exporter_port`` (0: none) are where it listens, for ``wait_ready``
    and the metrics helpers. ``base_env`` replaces ``os.environ`` under
    ``env``; ``new_session`` gives it its own process group (``kill_group``)."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        env: Mapping[str, str] | None = None,
        port: int = 0,
        nofile: tuple[int, int] | None = None,
        *,
        exporter_port: int = 0,
        command: Sequence[str] = (BROKER_BIN,),
        base_env: Mapping[str, str] | None = None,
        new_session: bool = False,
        log_path: Path | None = None,
    ) -> None:
        """``nofile``: the (soft, hard) open-files limit the broker starts with."""
        self.cwd = cwd
        self.port = port
        self.exporter_port = exporter_port
        self.host = "127.0.0.1"
        self.log_path = log_path or cwd / f"broker-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**(os.environ if base_env is None else base_env), **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.args = self.argv = [*command, *args]
        limit = None if nofile is None else functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, nofile)
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
            start_new_session=new_session,  # its own process group, as a shell job or a systemd unit
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 15.0, *, healthy: bool = False) -> BrokerProcess:
        """Until the broker listens on ``port`` and logged "serving" (and, with
        ``healthy``, its exporter's ``/healthz`` answers 200)."""
        assert self.port, "wait_ready needs the port the broker listens on"
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.port, timeout=timeout, proc=self.proc)
            if healthy:
                assert self.exporter_port, "healthy needs the exporter's port"
                wait_healthy(self.exporter_port, max(0.1, deadline - time.monotonic()), self.proc)
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{e}; its log ends:\n{self.log()[-1500:]}") from None
        # The listener is up before the "serving" line; wait for it too.
        while "serving" not in self.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        """The log once it holds ``needle`` (lines are written by the broker's log thread, a moment later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in broker log after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0, *, must_obey: bool = False) -> int:
        """``sig`` (SIGTERM: what ``docker stop`` sends), then the exit status; killed
        after ``timeout`` (and, with ``must_obey``, an AssertionError says so)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                if must_obey:
                    raise AssertionError(f"broker ignored signal {sig} for {timeout} s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as in a crash, if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()

    def kill_group(self) -> None:
        """SIGKILL to the broker's process group (``new_session``), if any of it is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.kill()


def start_on_free_ports(
    cwd: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    exporter: bool = False,
    nofile: tuple[int, int] | None = None,
) -> BrokerProcess:
    """``hpfeeds-broker --bind 127.0.0.1:PORT [--exporter 127.0.0.1:PORT2] *args``, not waited for."""
    port = free_port()
    bind = ["--bind", f"127.0.0.1:{port}"]
    exporter_port = free_port() if exporter else 0
    if exporter_port:
        bind += ["--exporter", f"127.0.0.1:{exporter_port}"]
    return BrokerProcess([*bind, *args], cwd, env=env, port=port, nofile=nofile, exporter_port=exporter_port)


def launch_broker(
    cwd: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    exporter: bool = False,
    nofile: tuple[int, int] | None = None,
) -> BrokerProcess:
    """``start_on_free_ports``, once serving and, with an exporter, healthy (stopped again if it never is)."""
    b = start_on_free_ports(cwd, *args, env=env, exporter=exporter, nofile=nofile)
    try:
        return b.wait_ready(healthy=exporter)
    except BaseException:
        b.stop()
        raise


class RawClient:
    """A blocking hpfeeds client on a raw socket, for tests that speak bytes."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        tls: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        rcvbuf: int | None = None,
        source: str | None = None,
    ) -> None:
        """``rcvbuf`` sets SO_RCVBUF before connecting (it sizes the TCP window): a subscriber that
        does not read then makes output queue in the broker. ``source``: the local address
        (another loopback address, e.g. 127.0.0.2, is another client address to the broker)."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        self.sock: socket.socket = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.decoder = Decoder.for_client()
        self.pending: list[Frame] = []
        self.ident = b""
        self.info: Info | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _frames(self, data: bytes) -> list[Frame]:
        # A client's decoder returns frames only (runs of PUBLISH frames are the broker's).
        return cast(list[Frame], self.decoder.feed(data))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_info(self) -> Info:
        frame = self.next_frame()
        assert isinstance(frame, Info), frame
        self.info = frame
        return frame

    def auth(self, ident: str, secret: str) -> RawClient:
        info = self.info or self.read_info()
        self.ident = ident.encode()
        self.send(encode_auth(self.ident, sign(info.nonce, secret.encode())))
        return self

    def subscribe(self, *channels: str) -> None:
        self.send(b"".join(encode_subscribe(self.ident, c.encode()) for c in channels))

    def unsubscribe(self, channel: str) -> None:
        self.send(encode_unsubscribe(self.ident, channel.encode()))

    def publish(self, channel: str, payload: bytes) -> None:
        self.send(encode_publish(self.ident, channel.encode(), payload))

    def next_frame(self, timeout: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame")
            self.sock.settimeout(remaining)
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("closed by broker")
            self.pending.extend(self._frames(data))
        return self.pending.pop(0)

    def frames(self, n: int, timeout: float = 10.0) -> list[Frame]:
        deadline = time.monotonic() + timeout
        return [self.next_frame(max(0.01, deadline - time.monotonic())) for _ in range(n)]

    def messages(self, n: int, timeout: float = 10.0) -> list[Publish]:
        out = self.frames(n, timeout)
        assert all(isinstance(f, Publish) for f in out), [f for f in out if not isinstance(f, Publish)][:3]
        return out  # type: ignore[return-value]

    def expect_error(self, timeout: float = 5.0) -> str:
        frame = self.next_frame(timeout)
        assert isinstance(frame, Error), frame
        return frame.message

    def expect_closed(self, timeout: float = 5.0) -> list[Frame]:
        """Read until EOF; returns frames received before it."""
        got: list[Frame] = list(self.pending)
        self.pending.clear()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("connection still open")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(262144)
            except ConnectionResetError:
                return got
            if not data:
                return got
            got.extend(self._frames(data))

    def probe_arrived(self, tag: bytes, wait: float) -> bytes | None:
        """The next frame within ``wait`` s, which must be a probe tagged ``tag`` (its payload), or None."""
        try:
            frame = self.next_frame(wait)
        except TimeoutError:
            return None
        assert isinstance(frame, Publish) and frame.payload.startswith(tag), f"{frame!r} before the probe"
        return frame.payload

    def expect_silence(self, seconds: float = 0.3) -> None:
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {data[:200]!r}")


def wait_info(
    port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 15.0, proc: subprocess.Popen | None = None
) -> Info:
    """Until a client connecting to ``port`` gets the broker's INFO (stronger than an open port)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before serving on {port}")
        try:
            with RawClient(port, tls=tls, timeout=2.0) as client:
                return client.read_info()
        except (OSError, AssertionError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"no INFO on {port} after {timeout} s ({last})")


def confirm_subscribed(publisher: RawClient, channel: str, *subscribers: RawClient, timeout: float = 10.0) -> None:
    """Instead of sleeping: probes published on ``channel`` until every subscriber
    has one, then a last probe that all of them read. Their SUBSCRIBE is then in
    place, and nothing but probes (no ERROR, no message) came to them before it.
    A publisher subscribed to ``channel`` gets the probes too: pass it among
    ``subscribers``. (A first probe alone is not enough: the SUBSCRIBE and the
    probe travel on different connections, in no set order.)"""
    tag = b"probe " + os.urandom(4).hex().encode()
    waiting = list(subscribers)
    deadline = time.monotonic() + timeout
    while waiting:
        assert time.monotonic() < deadline, f"no probe reached {len(waiting)} subscriber(s) on {channel!r}"
        publisher.publish(channel, tag + b" try")
        waiting = [sub for sub in waiting if sub.probe_arrived(tag, 0.1) is None]
    publisher.publish(channel, tag + b" last")
    for sub in subscribers:
        while (got := sub.probe_arrived(tag, max(0.01, deadline - time.monotonic()))) != tag + b" last":
            assert got is not None, f"the last probe on {channel!r} did not arrive"


def until_logged(b: BrokerProcess, needle: str, write: Callable[[], object], timeout: float = 10.0) -> None:
    """``write`` until the broker logs ``needle`` once more: the file watcher may
    not be watching yet right after start (nothing tells when it is)."""
    seen = b.log().count(needle)
    deadline = time.monotonic() + timeout
    while b.log().count(needle) == seen:
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{b.log()[-2000:]}"
        write()
        end = time.monotonic() + 1.0
        while b.log().count(needle) == seen and time.monotonic() < end:
            time.sleep(0.02)


def auth_reply(port: int, ident: str, secret: str, *, source: str = "127.0.0.1", channel: str = "chan1") -> str:
    """AUTH, SUBSCRIBE and PUBLISH on ``channel`` in one write (a refused AUTH
    closes the connection before any later write): "ok" when the message comes
    back, else the ERROR text."""
    with RawClient(port, source=source) as c:
        nonce = c.read_info().nonce
        who, chan = ident.encode(), channel.encode()
        c.send(
            encode_auth(who, sign(nonce, secret.encode()))
            + encode_subscribe(who, chan)
            + encode_publish(who, chan, b"auth probe")
        )
        frame = c.next_frame()
    if isinstance(frame, Publish) and frame.payload == b"auth probe":
        return "ok"
    assert isinstance(frame, Error), frame
    return frame.message


@contextlib.contextmanager
def running_broker(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, exporter: bool = False
) -> Iterator[BrokerProcess]:
    b = launch_broker(tmp_path, *args, env=env, exporter=exporter)
    try:
        yield b
    finally:
        b.stop()
