"""Measuring tools for the reliability suite: a canary pub/sub pair, broker
RSS and descriptors, Prometheus samples (from ``tests.support.metrics``), and
a place to record figures.

Every figure a test measures goes through ``record`` so ``pytest -s`` shows it
(and ``HPFEEDS3_FIGURES=path`` appends it to a JSON-lines file). Speed is a
figure, not a verdict: a speed bound goes through ``speed_bound``, recorded
always and asserted only when ``HPFEEDS3_TIMING_ASSERTS=1`` asks (on a quiet,
dedicated machine); CI on a shared machine asserts correctness alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from hpfeeds3.protocol import Decoder, Publish, encode_auth, encode_publish, encode_subscribe, sign
from tests.conftest import USERS
from tests.support.metrics import metric as metric
from tests.support.metrics import metric_sum as metric_sum
from tests.support.metrics import scrape as scrape
from tests.support.metrics import wait_metric as wait_metric
from tests.support.metrics import wait_subscribed as wait_subscribed

MiB = 1024 * 1024

# Keys of the reliability brokers: the suite's USERS plus a canary pair's own
# ident and channel, so the canary's traffic is never mixed with a test's.
RELIABILITY_USERS = {
    **USERS,
    "canary": {"secret": "canary-secret", "pubchans": ["canary"], "subchans": ["canary"]},
}


def budget_s(name: str, default: float) -> float:
    """A time budget: ``HPFEEDS3_<NAME>_SECONDS`` overrides the CI default."""
    return float(os.environ.get(f"HPFEEDS3_{name.upper()}_SECONDS", default))


def record(test: str, **figures: object) -> None:
    line = {"test": test, **figures}
    print(f"\nFIGURES {json.dumps(line)}", flush=True)
    path = os.environ.get("HPFEEDS3_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def timing_asserts() -> bool:
    """``HPFEEDS3_TIMING_ASSERTS=1``: assert the speed bounds, not only record them."""
    return os.environ.get("HPFEEDS3_TIMING_ASSERTS", "") == "1"


def speed_bound(
    test: str, name: str, figure: float, *, below: float | None = None, at_least: float | None = None
) -> bool:
    """A speed claim (``figure < below`` or ``figure >= at_least``): recorded with
    whether it held, asserted only under ``HPFEEDS3_TIMING_ASSERTS=1``."""
    held = (below is None or figure < below) and (at_least is None or figure >= at_least)
    limit = {"below": below} if below is not None else {"at_least": at_least}
    record(f"{test}[speed]", bound=name, figure=round(figure, 3), **limit, held=held)
    if timing_asserts():
        assert held, f"{test}: {name} = {figure:.3f}, bound {limit}"
    return held


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the broker process, seen from outside ---------------------------------------


class Probe:
    """RSS and descriptors of a broker process (psutil)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def fds(self) -> int:
        return self.proc.num_fds()

    def wait_fds(self, target: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        n = self.fds()
        while n > target and time.monotonic() < deadline:
            time.sleep(0.05)
            n = self.fds()
        return n


class PeakSampler:
    """Samples a broker's RSS in a thread; ``peak`` is the largest seen."""

    def __init__(self, probe: Probe, interval: float = 0.02) -> None:
        self.probe = probe
        self.interval = interval
        self.peak = probe.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.probe.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def close_reason(log: str, local_port: int) -> str | None:
    """The reason the broker logged for the connection from ``local_port``."""
    m = re.search(rf"closed 127\.0\.0\.\d+:{local_port}(?: \([^)]*\))?: (\w+)", log)
    return m.group(1) if m else None


def wait_close_reason(broker, local_port: int, timeout: float = 5.0) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        reason = close_reason(broker.log(), local_port)
        if reason is not None or time.monotonic() > deadline:
            return reason
        time.sleep(0.02)


# --- the canary -----------------------------------------------------------------------


@dataclass
class CanaryStats:
    sent: int = 0
    received: int = 0
    lost: int = 0
    reordered: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=float("nan"))

    def summary(self) -> dict[str, object]:
        return {
            "canary_sent": self.sent,
            "canary_received": self.received,
            "canary_lost": self.lost,
            "canary_p50_ms": round(self.p50_ms, 3),
            "canary_p99_ms": round(self.p99_ms, 3),
            "canary_max_ms": round(self.max_ms, 3),
        }


class Canary:
    """A publisher and a subscriber on their own channel, in two threads.

    The publisher stamps each message with a sequence number and the send
    time; the subscriber checks the sequence and records the latency. Both
    sockets stay open for the whole run, so a broker stall or a lost message
    shows here. ``window()`` returns the stats since the last call.
    """

    _STAMP = struct.Struct(">Qq")

    def __init__(self, port: int, rate_hz: float = 200.0, host: str = "127.0.0.1") -> None:
        self.port = port
        self.interval = 1.0 / rate_hz
        self.sub = _authed_socket(port, "canary", "canary-secret", host)
        self.sub.sendall(encode_subscribe(b"canary", b"canary"))
        self.pub = _authed_socket(port, "canary", "canary-secret", host)
        self._lock = threading.Lock()
        self._stats = CanaryStats()
        self._total = CanaryStats()
        self._stop = threading.Event()
        self._stop_publishing = threading.Event()
        self._next_expected = 0
        self._seq = 0
        self.errors: list[str] = []
        # Make sure the subscription is in place before the first stamped message.
        self._prime()
        self._threads = [
            threading.Thread(target=self._publish_loop, daemon=True),
            threading.Thread(target=self._read_loop, daemon=True),
        ]

    def _prime(self) -> None:
        decoder = Decoder.for_client()
        self.pub.sendall(encode_publish(b"canary", b"canary", b"prime"))
        self.sub.settimeout(5)
        while True:
            frames = decoder.feed(self.sub.recv(65536))
            if any(isinstance(f, Publish) and f.payload == b"prime" for f in frames):
                return

    def start(self) -> Canary:
        for t in self._threads:
            t.start()
        return self

    def _publish_loop(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set() and not self._stop_publishing.is_set():
            now = time.perf_counter()
            if now < next_at:
                time.sleep(min(next_at - now, 0.01))
                continue
            next_at += self.interval
            if next_at < now - 1:  # fell far behind (paused): do not burst
                next_at = now
            with self._lock:
                seq = self._seq
                self._seq += 1
                self._stats.sent += 1
                self._total.sent += 1
            try:
                self.pub.sendall(encode_publish(b"canary", b"canary", self._STAMP.pack(seq, time.perf_counter_ns())))
            except OSError as e:
                self.errors.append(f"publisher: {e!r}")
                return

    def _read_loop(self) -> None:
        decoder = Decoder.for_client()
        self.sub.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = self.sub.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                self.errors.append(f"subscriber: {e!r}")
                return
            if not data:
                self.errors.append("subscriber: closed by broker")
                return
            now = time.perf_counter_ns()
            for frame in decoder.feed(data):
                if not isinstance(frame, Publish):
                    self.errors.append(f"subscriber got {frame!r}")
                    continue
                seq, sent_ns = self._STAMP.unpack(frame.payload)
                with self._lock:
                    for st in (self._stats, self._total):
                        st.received += 1
                        st.latencies_ms.append((now - sent_ns) / 1e6)
                        if seq != self._next_expected:
                            st.reordered += 1
                            st.lost += max(0, seq - self._next_expected)
                    self._next_expected = seq + 1

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until everything sent so far has arrived (or the timeout)."""
        self._settled(timeout, lambda: None)

    def _settled(self, timeout: float, take: Callable[[], CanaryStats | None]) -> CanaryStats | None:
        """Run ``take`` under the lock at a moment when nothing sent is still in
        flight (or at the timeout): its figures are then consistent, however
        the publisher goes on."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._next_expected >= self._seq or time.monotonic() >= deadline:
                    return take()
            time.sleep(0.005)

    def window(self) -> CanaryStats:
        def take() -> CanaryStats:
            st, self._stats = self._stats, CanaryStats()
            return st

        st = self._settled(2.0, take)
        assert st is not None
        return st

    def total(self) -> CanaryStats:
        """A snapshot of the whole run so far."""

        def take() -> CanaryStats:
            t = self._total
            return CanaryStats(t.sent, t.received, t.lost, t.reordered, list(t.latencies_ms))

        st = self._settled(2.0, take)
        assert st is not None
        return st

    def stop(self) -> CanaryStats:
        """Stop publishing, let the last messages arrive, then stop reading."""
        self._stop_publishing.set()
        self._threads[0].join(5)
        total = self.total()
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in (self.pub, self.sub):
            with contextlib.suppress(OSError):
                s.close()
        return total


def _authed_socket(
    port: int, ident: str, secret: str, host: str = "127.0.0.1", *, rcvbuf: int | None = None
) -> socket.socket:
    """Connected, INFO read, AUTH sent. ``rcvbuf`` is set before connect (it sizes the TCP window)."""
    sock = socket.socket()
    sock.settimeout(5)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decoder = Decoder.for_client()
    frames: list = []
    while not frames:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed before INFO")
        frames = decoder.feed(data)
    sock.sendall(encode_auth(ident.encode(), sign(frames[0].nonce, secret.encode())))
    return sock
