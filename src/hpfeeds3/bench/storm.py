"""The reconnect storm: N sensors connect at once, as after a broker restart.

Every sensor connects, authenticates (its own key ``storm-i``, or the shared
key ``storm``), subscribes to its channel and publishes one message there; it
has been served once that message has come back to it. All connections are
opened as fast as one thread can (a read pass every 256 connects; a TLS
sensor's ClientHello goes out with its connect, as from a host of its own)
and stay open until the last sensor is served; then all are closed with RST. Against a
loopback broker each sensor connects from its own address (127.1.0.1 on), as
sensors are separate hosts.

Figures: the time from the first connect until the last sensor is served,
handshakes/s over that time, the broker's CPU per handshake (its CPU time,
over the process and its workers, divided by the sensors served: a figure
that does not depend on how fast the load generator is), the same including
the close, the broker's peak RSS, and the sensors refused (connection reset or
closed, an ERROR) or timed out. A sensor behaves as one using hpfeeds3's
client: an attempt refused, answered with ERROR, or with no INFO within the
client's connect timeout (10 s for TCP, TLS and INFO: a connection the kernel
dropped from a full listen queue is never answered) is retried after the
client's backoff, until the storm's deadline. Once INFO has come, the sensor
waits for its message back however long it takes, as the client does.
Attempts refused, ERRORs, connect timeouts and retries are reported;
``failed`` counts the sensors never served. None of these fail the run: they
are figures.

With TLS, ``resume`` first runs an unmeasured storm to collect one TLS session
per sensor, then the measured one resumes them: a sensor reconnecting after a
blip, with the session it had.
"""

from __future__ import annotations

import heapq
import resource
import ssl
import statistics
import time
from typing import Any

from ..client.aio import DEFAULT_CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S
from ..client.backoff import Backoff
from .credentials import storm_sensor, write_storm_sqlite
from .handshake import WAIT_CONFIRM, Handshaker, raise_open_files_limit
from .proc import process_tree, tree_cpu_seconds, tree_rss_bytes
from .wire import BenchError, Target

STORM_TIMEOUT_S = 60.0  # plus 5 ms per sensor: a sensor not served by then has timed out
RSS_SAMPLE_S = 0.05
CONNECTS_PER_PASS = 256  # connects between two read passes
SETTLE_S = 5.0  # most to wait for the broker to finish closing (CPU no longer rising)
KEYS_SETTLE_S = 2.0  # after writing keys into a running broker's store: let it see the change first


def sensor_address(i: int) -> str:
    """Sensor ``i``'s own loopback source address, 127.1.0.1 onwards: a storm
    comes from many hosts, and the broker's per-address limits see it so."""
    n = i + 1
    return f"127.{1 + (n >> 16) % 254}.{(n >> 8) & 255}.{n & 255}"


def _load_cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def run_storm(
    target: Target,
    *,
    sensors: int,
    shared: bool,
    broker_pid: int | None,
    resume: bool = False,
    keys_sqlite: str | None = None,
) -> dict[str, Any]:
    limit = raise_open_files_limit()
    if sensors + 64 > limit:
        raise BenchError(f"{sensors} sensors need more open files than RLIMIT_NOFILE allows ({limit})")
    if keys_sqlite and write_storm_sqlite(keys_sqlite, sensors):
        time.sleep(KEYS_SETTLE_S)
    if resume and not target.tls:
        return {"sensors": sensors, "skipped": "plain TCP: no TLS session to resume (run with --tls)"}
    pids = process_tree(broker_pid) if broker_pid else []
    tls = target.tls_context()
    sessions: list[ssl.SSLSession | None] | None = None
    if resume:
        sessions = [None] * sensors
        _storm(target, tls, sensors, shared, pids, None, sessions)
        time.sleep(0.5)
    result = _storm(target, tls, sensors, shared, pids, sessions, None)
    result["tls"] = target.tls
    return result


def _storm(
    target: Target,
    tls: ssl.SSLContext | None,
    sensors: int,
    shared: bool,
    pids: list[int],
    resume: list[ssl.SSLSession | None] | None,
    keep_sessions: list[ssl.SSLSession | None] | None,
) -> dict[str, Any]:
    creds: list[tuple[bytes, ...]] = []
    for i in range(sensors):
        creds.append((*(text.encode() for text in storm_sensor(i, shared)), b"storm:%d" % i))
    hs = Handshaker(target, shared_channels=shared, tolerant=True, tls=tls)
    from_many = target.host.startswith("127.")  # sensors are hosts: each from its own loopback address
    backoff = Backoff()
    index: dict[int, tuple[int, int]] = {}  # fd -> (sensor, attempt)
    first_start: list[float] = [0.0] * sensors
    retry: list[tuple[float, int, int]] = []  # heap of (when, sensor, attempt)
    served: list[float] = []
    resumed = retries = 0
    refused = errors = info_timeouts = 0
    failures: list[str] = []
    rss_before = tree_rss_bytes(pids) if pids else 0
    rss_peak = rss_before
    cpu_before = tree_cpu_seconds(pids) if pids else None
    load_before = _load_cpu_seconds()
    next_sample = next_expiry = 0.0

    def start(i: int, attempt: int) -> None:
        nonlocal refused
        ident_b, secret_b, channel_b, marker = creds[i]
        try:
            conn = hs.start(
                channel_b,
                marker,
                ident_b,
                secret_b,
                session=resume[i] if resume else None,
                source=sensor_address(i) if from_many else None,
            )
        except (BenchError, OSError) as e:
            refused += 1
            failed(i, attempt, str(e))
            return
        index[conn.fd] = (i, attempt)

    def failed(i: int, attempt: int, why: str) -> None:
        """Like a sensor with hpfeeds3's client: reconnect after its backoff."""
        nonlocal retries
        if len(failures) < 3:
            failures.append(why)
        retries += 1
        heapq.heappush(retry, (time.monotonic() + backoff.delay(attempt), i, attempt + 1))

    def collect(timeout: float) -> None:
        nonlocal resumed, refused, errors, info_timeouts, rss_peak, next_sample, next_expiry
        for conn in hs.step(timeout):
            i, _ = index.pop(conn.fd)
            served.append(time.monotonic() - first_start[i])
            if isinstance(conn.sock, ssl.SSLSocket):
                resumed += bool(conn.sock.session_reused)
                if keep_sessions is not None:
                    keep_sessions[i] = conn.sock.session
        for conn, why in hs.failed:
            i, attempt = index.pop(conn.fd)
            if "ERROR" in why:
                errors += 1
            else:
                refused += 1
            failed(i, attempt, why)
        hs.failed.clear()
        now = time.monotonic()
        while retry and retry[0][0] <= now:
            _, i, attempt = heapq.heappop(retry)
            start(i, attempt)
        if now >= next_expiry:  # no INFO within the client's connect timeout
            next_expiry = now + 0.5
            late = [
                c
                for c in hs.conns.values()
                if c.state < WAIT_CONFIRM and c.fd in index and now - c.started > CONNECT_TIMEOUT_S
            ]
            for conn in late:  # (served sensors stay connected: not late)
                i, attempt = index.pop(conn.fd)
                hs.close(conn)
                info_timeouts += 1
                failed(i, attempt, f"no INFO from the broker within {CONNECT_TIMEOUT_S:g} s")
        if pids and now >= next_sample:
            rss_peak = max(rss_peak, tree_rss_bytes(pids))
            next_sample = now + RSS_SAMPLE_S

    t0 = time.monotonic()
    t_last = t0
    try:
        for i in range(sensors):
            first_start[i] = time.monotonic()
            start(i, 0)
            if i % CONNECTS_PER_PASS == CONNECTS_PER_PASS - 1:
                collect(0)
        started_s = time.monotonic() - t0
        deadline = t0 + STORM_TIMEOUT_S + sensors * 0.005
        while (index or retry) and time.monotonic() < deadline:
            before = len(served)
            collect(RSS_SAMPLE_S)
            if len(served) > before:
                t_last = time.monotonic()
        timed_out = sensors - len(served)
        cpu_served = tree_cpu_seconds(pids) if pids else None
        load_cpu = _load_cpu_seconds() - load_before
    finally:
        hs.shutdown()
    cpu_closed = _settle(pids) if pids else None

    done = len(served)
    elapsed = t_last - t0
    result: dict[str, Any] = {
        "sensors": sensors,
        "shared_key": shared,
        "served": done,
        "refused": refused,
        "errors": errors,
        "connect_timeouts": info_timeouts,
        "retries": retries,
        "timed_out": timed_out,
        "failed": timed_out,
        "storm_s": round(elapsed, 3),
        "connects_issued_s": round(started_s, 3),
        "handshakes_per_s": round(done / elapsed) if elapsed > 0 else 0,
        "load_cpu_s": round(load_cpu, 2),
    }
    if served:
        ordered = sorted(served)
        result["p50_ms"] = round(statistics.median(ordered) * 1000, 1)
        result["p99_ms"] = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)
    if resume is not None:
        result["resumed"] = resumed
    if failures:
        result["first_failures"] = failures
    if pids and cpu_before is not None and cpu_served is not None and done:
        result["broker_processes"] = len(pids)
        result["broker_cpu_s"] = round(cpu_served - cpu_before, 3)
        result["broker_us_per_handshake"] = round((cpu_served - cpu_before) / done * 1e6)
        if cpu_closed is not None:
            result["broker_us_per_connection"] = round((cpu_closed - cpu_before) / done * 1e6)
        result["rss_before_mib"] = round(rss_before / 2**20, 1)
        result["rss_peak_mib"] = round(rss_peak / 2**20, 1)
    return result


def _settle(pids: list[int]) -> float:
    """The broker's CPU time once it has stopped working on the closed connections."""
    until = time.monotonic() + SETTLE_S
    last = tree_cpu_seconds(pids)
    while time.monotonic() < until:
        time.sleep(0.2)
        now = tree_cpu_seconds(pids)
        if now - last < 0.005:
            return now
        last = now
    return last
