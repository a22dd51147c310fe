"""Message-flow scenarios: pubsub, fanout, fanin (throughput) and latency.

Publishers and subscribers run in two separate processes (so neither waits for
the other's GIL), both driven by the parent through pipes:

    parent ──start──> subscriber process: connect, AUTH, SUBSCRIBE (confirmed) ──ready──>
    parent ──start──> publisher process:  connect, AUTH ──ready──>
    parent ──go(t0)─> publisher sends for `duration` s ──done(counts)──> parent
    parent ──totals─> subscriber, which reads until it has every message ──result──> parent

Times are ``time.monotonic()``, one clock for all processes on Linux. A
throughput figure is what the subscribers verified, divided by the time from
the end of the warm-up to the last verified message: end to end, drain included.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import selectors
import socket
import ssl
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

from hpfeeds3.protocol import HEADER_LEN, encode_publish, encode_subscribe

from .wire import (
    BATCH_BYTES,
    PAYLOAD_FIELDS,
    SETUP_PREFIX,
    TIME_OFF,
    BenchError,
    Checker,
    Client,
    Stream,
    Target,
    describe_mismatch,
)

RCVLOWAT_BYTES = 64 * 1024  # wake a subscriber per 64 KiB, not per message
RECV_BUFFER_BYTES = 1024 * 1024  # one recv_into
SETUP_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 5.0  # no verified message for this long after the publishers stopped: lost
IDLE_POLL_S = 0.02  # a subscriber drains what is below the low-water mark this often
# Publishers stop when this much is sent but not yet verified by every subscriber:
# enough to keep every buffer on the path busy, little enough that a broker which
# buffers without bound (the reference) drains in seconds, not minutes.
WINDOW_BYTES = 8 * 1024 * 1024
WINDOW_POLL_S = 0.0005
TAIL_CHECK_S = 0.05  # after the last message, wait this long to be sure nothing more comes
FANIN_BATCH_BYTES = 64 * 1024  # per publisher, when there are many


def _setup_marker(i: int) -> bytes:
    return SETUP_PREFIX + b"subscriber-%d" % i


# Time for a cluster node's interest in a channel to reach the other nodes.
CLUSTER_SETTLE_S = 1.0


def subscribe_all(target: Target, n: int) -> list[Client]:
    """``n`` connections subscribed to ``target.channel``, each confirmed.

    Subscriber i subscribes and publishes marker i; every subscriber 0..i
    waits for marker i. After the last, every connection has read all the
    markers that will ever reach it, so its stream holds benchmark frames only.
    Subscriber 0 authenticates as ``target.sub_ident`` when set (that key
    needs to publish and subscribe on the channel too).
    """
    clients: list[Client] = []
    for i in range(n):
        c = target.sub_client(SETUP_TIMEOUT_S, i)
        clients.append(c)
        marker = _setup_marker(i)
        c.sock.sendall(encode_subscribe(c.ident, target.channel) + encode_publish(c.ident, target.channel, marker))
        for other in clients:
            other.wait_for(target.channel, marker, SETUP_TIMEOUT_S)
    for c in clients:
        if not c.idle:
            raise BenchError("a subscriber received data before the publishers started")
    if target.sub_port:
        # The subscribers' node subscribes to the channel's NATS subject after
        # the local SUBSCRIBE; give the cluster link a moment before publishing.
        time.sleep(CLUSTER_SETTLE_S)
    return clients


# --- child processes ---------------------------------------------------------------


def _child(conn: multiprocessing.connection.Connection, body: Callable[..., Any], *args: Any) -> None:
    try:
        body(conn, *args)
    except BenchError as e:
        conn.send(("error", str(e)))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class _Reader:
    """One subscriber connection on the hot path: recv_into, verify, keep the tail."""

    __slots__ = ("buf", "checker", "have", "sock", "tls", "view")

    def __init__(self, client: Client, checker: Checker):
        self.sock = client.sock
        self.tls = isinstance(client.sock, ssl.SSLSocket)
        self.checker = checker
        self.buf = bytearray(RECV_BUFFER_BYTES + checker.frame_len)
        self.view = memoryview(self.buf)
        self.have = 0

    def read(self) -> None:
        """One recv (for TLS: until OpenSSL holds nothing more)."""
        while True:
            try:
                n = self.sock.recv_into(self.view[self.have :])
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if n == 0:
                raise BenchError("the broker closed a subscriber connection")
            end = self.have + n
            whole = end - end % self.checker.frame_len
            if whole:
                fault = self.checker.feed(self.buf, whole)
                if fault:
                    raise BenchError(fault)
                self.buf[: end - whole] = self.view[whole:end]
            self.have = end - whole
            if not (self.tls and self.sock.pending()):  # type: ignore[attr-defined]
                return


def _expect_silence(readers: list[_Reader]) -> None:
    """Every message has arrived: anything more is a duplicate or a stray frame."""
    time.sleep(TAIL_CHECK_S)
    for r in readers:
        try:
            n = r.sock.recv_into(r.view[r.have :])
        except (BlockingIOError, ssl.SSLWantReadError):
            n = 0
        if n or r.have:
            fault = describe_mismatch(r.buf, 0, r.have + n, r.checker) if r.have + n >= HEADER_LEN else ""
            raise BenchError(f"{r.have + n} bytes arrived after the last message: {fault}")


def _subscriber_main(
    conn: multiprocessing.connection.Connection,
    target: Target,
    subscribers: int,
    publishers: int,
    payload: int,
    batch_bytes: int,
    delivered: Any,
) -> None:
    clients = subscribe_all(target, subscribers)
    readers = []
    for c in clients:
        streams = [Stream(target.ident, target.channel, pid, payload, batch_bytes) for pid in range(publishers)]
        readers.append(_Reader(c, Checker(streams)))
        c.sock.setblocking(False)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RCVLOWAT_BYTES)
    sel = selectors.DefaultSelector()
    for r in readers:
        sel.register(r.sock, selectors.EVENT_READ, r)
    sel.register(conn, selectors.EVENT_READ, None)
    conn.send(("ready",))

    t0 = warm_at = float("inf")
    warm_t = warm_frames = None
    totals: dict[int, int] | None = None
    last_frames = 0
    t_last = time.monotonic()
    while True:
        events = sel.select(IDLE_POLL_S)
        for key, _ in events:
            if key.data is None:
                msg = conn.recv()
                if msg[0] == "go":
                    t0, warm_at = msg[1], msg[1] + msg[2]
                elif msg[0] == "totals":
                    totals = msg[1]
                    for r in readers:  # the tail may be shorter than the low-water mark
                        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                continue
            key.data.read()
        if not events:
            for r in readers:
                r.read()
        now = time.monotonic()
        frames = 0
        for i, r in enumerate(readers):
            delivered[i] = n = r.checker.frames
            frames += n
        if frames != last_frames:
            last_frames, t_last = frames, now
        if warm_t is None and now >= warm_at:
            warm_t, warm_frames = now, frames
        if totals is not None:
            if all(not r.checker.missing(totals) for r in readers):
                _expect_silence(readers)
                break
            if now - t_last > STALL_TIMEOUT_S:
                missing = [r.checker.missing(totals) for r in readers]
                lost = sum(sum(m.values()) for m in missing)
                raise BenchError(f"{lost} messages lost (per subscriber, per publisher: {missing})")
    if warm_t is None or warm_t >= t_last:
        warm_t, warm_frames = t0, 0
    conn.send(
        (
            "result",
            {
                "delivered": last_frames,
                "measured": last_frames - (warm_frames or 0),
                "elapsed_s": t_last - warm_t,
                "t_last": t_last,
            },
        )
    )
    conn.recv()  # "close": keep the connections until the parent is done
    for c in clients:
        c.close()


def _publisher_main(
    conn: multiprocessing.connection.Connection,
    target: Target,
    publishers: int,
    payload: int,
    batch_bytes: int,
    duration: float,
    delivered: Any,
) -> None:
    clients = [target.client(SETUP_TIMEOUT_S) for _ in range(publishers)]
    streams = [Stream(target.ident, target.channel, pid, payload, batch_bytes) for pid in range(publishers)]
    window = max(WINDOW_BYTES, 2 * publishers * batch_bytes) // streams[0].frame_len
    conn.send(("ready",))
    msg = conn.recv()
    t0 = msg[1]
    sel = selectors.DefaultSelector()
    # Per connection: [stream, memoryview of the batch being sent, bytes of it sent].
    states = []
    for c, s in zip(clients, streams, strict=True):
        c.sock.setblocking(False)
        states.append((c.sock, [s, memoryview(s.next_batch()), 0]))
    for sock, state in states:
        sel.register(sock, selectors.EVENT_WRITE, state)
    time.sleep(max(0.0, t0 - time.monotonic()))
    deadline = t0 + duration
    active = len(clients)
    # A batch, once started, is always sent whole; the window only holds back the
    # next one. Connections waiting for room in the window are parked.
    parked: list[tuple[socket.socket, list]] = []
    in_flight = sum(s.sent for s in streams)  # frames sent, not yet verified by the slowest subscriber
    last_delivered, stalled_since = -1, time.monotonic()
    while active:
        if parked:
            now = time.monotonic()
            delivered_now = min(delivered)
            in_flight = sum(s.sent for s in streams) - delivered_now
            if delivered_now != last_delivered:
                last_delivered, stalled_since = delivered_now, now
            if now >= deadline:
                active -= len(parked)
                parked.clear()
            elif in_flight <= window:
                for sock, state in parked:
                    stream = state[0]
                    assert isinstance(stream, Stream)
                    state[1], state[2] = memoryview(stream.next_batch()), 0
                    in_flight += stream.frames_per_batch
                    sel.register(sock, selectors.EVENT_WRITE, state)
                parked.clear()
            elif now - stalled_since > STALL_TIMEOUT_S:
                raise BenchError(f"subscribers stopped receiving for {STALL_TIMEOUT_S:.0f} s")
            if len(parked) == active:
                time.sleep(WINDOW_POLL_S)
                continue
        for key, _ in sel.select(WINDOW_POLL_S if parked else 1.0):
            state = key.data
            stream, batch, off = state
            try:
                off += key.fileobj.send(batch[off:])  # type: ignore[union-attr]
            except (BlockingIOError, ssl.SSLWantWriteError):
                continue
            except OSError as e:
                raise BenchError(f"publisher connection failed: {e}") from None
            if off < len(batch):
                state[2] = off
                continue
            if time.monotonic() >= deadline:
                sel.unregister(key.fileobj)
                active -= 1
            elif in_flight + stream.frames_per_batch > window:
                sel.unregister(key.fileobj)
                parked.append((key.fileobj, state))  # type: ignore[arg-type]
            else:
                state[1] = memoryview(stream.next_batch())
                state[2] = 0
                in_flight += stream.frames_per_batch
    t_end = time.monotonic()
    for c in clients:
        c.sock.setblocking(True)
        c.check_no_error()
    conn.send(("done", {s.pid: s.sent for s in streams}, t_end))
    conn.recv()  # "close"
    for c in clients:
        c.close(reset=False)  # a RST could discard what the broker has not read yet


class _Children:
    """Start child processes, talk to them with timeouts, always stop them."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("fork")
        self._procs: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
        self._early: dict[multiprocessing.connection.Connection, tuple] = {}

    def start(self, body: Callable[..., Any], *args: Any) -> multiprocessing.connection.Connection:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_child, args=(child, body, *args), daemon=True)
        p.start()
        child.close()
        self._procs.append((p, parent))
        return parent

    def shared_counters(self, n: int) -> Any:
        """``n`` int64 counters in shared memory, written by one process each."""
        return self._ctx.Array("q", n, lock=False)

    def expect(self, conn: multiprocessing.connection.Connection, what: str, timeout: float) -> tuple:
        """The next message from ``conn``, which must be ``what``; an error
        reported by *any* child meanwhile ends the run at once."""
        deadline = time.monotonic() + timeout
        while True:
            msg: tuple | None
            if conn in self._early:
                msg = self._early.pop(conn)
            else:
                left = deadline - time.monotonic()
                ready = multiprocessing.connection.wait([c for _, c in self._procs], max(0.0, left))
                if not ready:
                    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
                msg = None
                for c in ready:
                    assert isinstance(c, multiprocessing.connection.Connection)
                    try:
                        m = c.recv()
                    except EOFError:
                        raise BenchError(f"a benchmark process died while waiting for {what}") from None
                    if m[0] == "error":
                        raise BenchError(m[1])
                    if c is conn:
                        msg = m
                    else:
                        self._early[c] = m
                if msg is None:
                    continue
            assert msg is not None
            if msg[0] != what:
                raise BenchError(f"expected {what!r} from a benchmark process, got {msg[0]!r}")
            return msg

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for _p, conn in self._procs:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        for p, conn in self._procs:
            p.join(5.0)
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            conn.close()


def run_throughput(
    target: Target, *, publishers: int, subscribers: int, payload: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Publishers send as fast as the broker takes it; every subscriber checks every message."""
    batch_bytes = BATCH_BYTES if publishers == 1 else FANIN_BATCH_BYTES
    with _Children() as kids:
        delivered = kids.shared_counters(subscribers)
        sub = kids.start(_subscriber_main, target, subscribers, publishers, payload, batch_bytes, delivered)
        kids.expect(sub, "ready", SETUP_TIMEOUT_S * (subscribers + 1))
        pub = kids.start(_publisher_main, target, publishers, payload, batch_bytes, duration, delivered)
        kids.expect(pub, "ready", SETUP_TIMEOUT_S * 2)
        t0 = time.monotonic() + 0.05
        sub.send(("go", t0, warmup))
        pub.send(("go", t0))
        _, counts, t_end = kids.expect(pub, "done", duration + 30 + STALL_TIMEOUT_S)
        sub.send(("totals", counts))
        _, res = kids.expect(sub, "result", 60 + STALL_TIMEOUT_S * 2)
    published = sum(counts.values())
    rate = res["measured"] / res["elapsed_s"] if res["elapsed_s"] > 0 else 0.0
    per_message = rate / subscribers
    return {
        "published": published,
        "delivered": res["delivered"],
        "lost": published * subscribers - res["delivered"],
        "msgs_per_s": round(per_message),
        "deliveries_per_s": round(rate),
        "mb_per_s": round(rate * payload / 1e6, 1),
        "drain_s": round(max(0.0, res["t_last"] - t_end), 3),
        "elapsed_s": round(res["elapsed_s"], 3),
    }


# --- latency ---------------------------------------------------------------------------

_TIME = struct.Struct("<Q")


def _latency_publisher_main(
    conn: multiprocessing.connection.Connection, target: Target, payload: int, rate: float, duration: float
) -> None:
    client = target.client(SETUP_TIMEOUT_S)
    stream = Stream(target.ident, target.channel, 0, payload, batch_bytes=0)  # one frame per batch
    time_at = stream.payload_off + TIME_OFF
    conn.send(("ready",))
    t0 = conn.recv()[1]
    time.sleep(max(0.0, t0 - time.monotonic()))
    deadline = t0 + duration
    sock = client.sock
    sent = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        due = int((now - t0) * rate) + 1
        while sent < due:
            frame = stream.next_batch()
            _TIME.pack_into(frame, time_at, time.monotonic_ns())
            sock.sendall(frame)
            sent += 1
        time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    client.check_no_error()
    conn.send(("done", {0: sent}, time.monotonic()))
    conn.recv()
    client.close(reset=False)


def _latency_subscriber_main(conn: multiprocessing.connection.Connection, target: Target, payload: int) -> None:
    (client,) = subscribe_all(target, 1)
    ref = Stream(target.ident, target.channel, 0, payload, batch_bytes=0)
    frame_len = ref.frame_len
    head = bytes(ref.buf[: ref.payload_off])  # header, ident, channel
    fields_at = ref.payload_off
    sock = client.sock
    sock.settimeout(IDLE_POLL_S * 5)
    buf = bytearray(RECV_BUFFER_BYTES + frame_len)
    view = memoryview(buf)
    have = 0
    latencies: list[int] = []
    total: int | None = None
    warm_ns = None
    expected = 0
    last_progress = time.monotonic()
    conn.send(("ready",))
    while True:
        if conn.poll():
            msg = conn.recv()
            if msg[0] == "go":
                warm_ns = int((msg[1] + msg[2]) * 1e9)
            elif msg[0] == "totals":
                total = msg[1][0]
        if total is not None and expected == total:
            break
        try:
            n = sock.recv_into(view[have:])
        except TimeoutError:
            if total is not None and time.monotonic() - last_progress > STALL_TIMEOUT_S:
                raise BenchError(f"{total - expected} messages lost") from None
            continue
        now_ns = time.monotonic_ns()
        if n == 0:
            raise BenchError("the broker closed the subscriber connection")
        end = have + n
        pos = 0
        while end - pos >= frame_len:
            if not buf.startswith(head, pos):
                raise BenchError(describe_mismatch(buf, pos, end, Checker([ref])))
            pid, batch, _index, sent_ns = PAYLOAD_FIELDS.unpack_from(buf, pos + fields_at)
            if pid != 0 or batch != expected:
                kind = "lost" if batch > expected else "duplicated or reordered"
                raise BenchError(f"got message #{batch}, expected #{expected} ({kind})")
            expected += 1
            if warm_ns is not None and sent_ns >= warm_ns:
                latencies.append(now_ns - sent_ns)
            pos += frame_len
        buf[: end - pos] = view[pos:end]
        have = end - pos
        last_progress = time.monotonic()
    conn.send(("result", {"delivered": expected, "latencies_ns": latencies}))
    conn.recv()
    client.close()


def run_latency(target: Target, *, rate: float, payload: int, duration: float, warmup: float) -> dict[str, Any]:
    """One publisher at a fixed rate, one subscriber; send-to-receive time of each message."""
    with _Children() as kids:
        sub = kids.start(_latency_subscriber_main, target, payload)
        kids.expect(sub, "ready", SETUP_TIMEOUT_S * 2)
        pub = kids.start(_latency_publisher_main, target, payload, rate, duration)
        kids.expect(pub, "ready", SETUP_TIMEOUT_S * 2)
        t0 = time.monotonic() + 0.05
        sub.send(("go", t0, warmup))
        pub.send(("go", t0))
        _, counts, _t_end = kids.expect(pub, "done", duration + 30)
        sub.send(("totals", counts))
        _, res = kids.expect(sub, "result", 30 + STALL_TIMEOUT_S * 2)
    lat = sorted(res["latencies_ns"])
    if not lat:
        raise BenchError("no message arrived after the warm-up")

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6, 3)

    return {
        "published": counts[0],
        "delivered": res["delivered"],
        "lost": counts[0] - res["delivered"],
        "rate": rate,
        "achieved_rate": round(counts[0] / duration),
        "samples": len(lat),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] / 1e6, 3),
    }
