"""Connection scenarios: handshakes per second, and memory per idle connection.

One thread drives many non-blocking sockets through the client side of the
handshake with ``selectors``:

    CONNECTING ──> (TLS) ──> INFO received: send AUTH + SUBSCRIBE (+ PUBLISH marker)
               ──> CONFIRM: own marker received back  (connect scenario)
               ──> SUBSCRIBED                          (idle scenario)

A handshake counts only once the broker has delivered the connection's own
PUBLISH back to it on the channel it subscribed: then AUTH was accepted and the
subscription is in place. Sockets are closed with RST, so that thousands of
handshakes per second do not exhaust the ephemeral ports with TIME_WAIT.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import socket
import ssl
import time
from typing import Any

from hpfeeds3.protocol import (
    Error,
    Info,
    ProtocolError,
    Publish,
    encode_auth,
    encode_publish,
    encode_subscribe,
    sign,
)

from .proc import rss_bytes
from .wire import BenchError, Target, client_decoder, set_linger_reset

HANDSHAKE_TIMEOUT_S = 10.0
CONFIRM_ROUNDS = 10  # idle: markers published before giving up on a subscription
CONFIRM_WAIT_S = 2.0  # per marker
SETTLE_S = 1.0  # idle: let the broker finish its work before reading its RSS

CONNECTING, TLS_HANDSHAKE, WAIT_INFO, WAIT_CONFIRM, SUBSCRIBED = range(5)


class _Conn:
    __slots__ = ("channel", "decoder", "fd", "ident", "marker", "secret", "sock", "started", "state")

    def __init__(self, sock: socket.socket, channel: bytes, marker: bytes | None, ident: bytes, secret: bytes):
        self.sock = sock
        self.fd = sock.fileno()
        self.channel = channel
        self.marker = marker
        self.ident = ident
        self.secret = secret
        self.decoder = client_decoder()
        self.state = CONNECTING
        self.started = time.monotonic()


_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


class Handshaker:
    """Drives connections through the handshake; ``step`` returns finished ones.

    Few system calls per handshake, since the load generator has one core as
    the broker does: the socket is created non-blocking, a plain connection
    waits for INFO straight away (a failed connect wakes it too), and a closed
    socket leaves the epoll set by itself.
    """

    def __init__(
        self,
        target: Target,
        *,
        shared_channels: bool = False,
        tolerant: bool = False,
        tls: ssl.SSLContext | None = None,
    ):
        """``shared_channels``: other connections publish on a connection's
        channel too, so markers not its own are skipped. ``tolerant``: a
        connection that fails is closed and listed in ``failed`` instead of
        failing the run. ``tls``: the client context (a TLS session resumes
        only with the context that made it)."""
        self.target = target
        self.tls = tls or target.tls_context()
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.addr = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)[0]
        self.shared_channels = shared_channels
        self.tolerant = tolerant
        self.failed: list[tuple[_Conn, str]] = []

    def start(
        self,
        channel: bytes,
        marker: bytes | None,
        ident: bytes | None = None,
        secret: bytes | None = None,
        session: ssl.SSLSession | None = None,
        source: str | None = None,
    ) -> _Conn:
        """Open a connection; ``session``: resume this TLS session; ``source``:
        the local address to connect from."""
        family, type_, proto, _, sockaddr = self.addr
        sock = socket.socket(family, type_ | socket.SOCK_NONBLOCK, proto)
        if source is not None:
            sock.bind((source, 0))
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise BenchError(f"connect to {self.target.host}:{self.target.port} failed: {os.strerror(err)}")
        if self.tls is not None:
            sock = self.tls.wrap_socket(
                sock, server_hostname=self.target.host, do_handshake_on_connect=False, session=session
            )
        t = self.target
        conn = _Conn(sock, channel, marker, ident or t.ident, secret or t.secret)
        if self.tls is None:
            conn.state = WAIT_INFO
            self.epoll.register(conn.fd, _IN)
        elif self._client_hello_now(conn):
            self.epoll.register(conn.fd, _IN)
        else:
            self.epoll.register(conn.fd, _OUT)
        self.conns[conn.fd] = conn
        return conn

    @staticmethod
    def _client_hello_now(conn: _Conn) -> bool:
        """Send the ClientHello as soon as the TCP connection is up, as a sensor's own
        host does (the ACK and the ClientHello leave together), rather than at the
        next read pass, hundreds of connects later. True when it went out; else the
        connection waits to be writable (still connecting)."""
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            conn.state = TLS_HANDSHAKE
            return True
        except (ssl.SSLWantWriteError, BlockingIOError):
            return False
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.EAGAIN):
                return False
            raise BenchError(f"TLS handshake failed: {e}") from None
        return False  # (a handshake needs the server's answer: never complete here)

    def step(self, timeout: float) -> list[_Conn]:
        """Advance every ready connection; return those that reached the goal."""
        done = []
        conns = self.conns
        for fd, _ in self.epoll.poll(timeout):
            conn = conns.get(fd)
            if conn is None:
                continue
            try:
                finished = self._advance(conn)
            except BenchError as e:
                if not self.tolerant:
                    raise
                self.failed.append((conn, str(e)))
                self.close(conn)
                continue
            if finished:
                done.append(conn)
        return done

    def _advance(self, conn: _Conn) -> bool:
        sock = conn.sock
        if conn.state == CONNECTING:  # TLS only: wait for the TCP connection first
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise BenchError(f"connect failed: {os.strerror(err)}")
            conn.state = TLS_HANDSHAKE
        if conn.state == TLS_HANDSHAKE:
            try:
                sock.do_handshake()  # type: ignore[attr-defined]
            except ssl.SSLWantReadError:
                self.epoll.modify(conn.fd, _IN)
                return False
            except ssl.SSLWantWriteError:
                self.epoll.modify(conn.fd, _OUT)
                return False
            except (ssl.SSLError, OSError) as e:
                raise BenchError(f"TLS handshake failed: {e}") from None
            conn.state = WAIT_INFO
            self.epoll.modify(conn.fd, _IN)
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return False
            except OSError as e:
                raise BenchError(f"connection failed during the handshake: {e}") from None
            if not data:
                raise BenchError("the broker closed a connection during the handshake")
            try:
                frames = conn.decoder.feed(data)
            except ProtocolError as e:
                raise BenchError(f"broker broke the protocol: {e}") from None
            for frame in frames:
                if isinstance(frame, Error):
                    raise BenchError(f"broker sent ERROR: {frame.message!r}")
                if conn.state == WAIT_INFO and isinstance(frame, Info):
                    ident = conn.ident
                    out = encode_auth(ident, sign(frame.nonce, conn.secret)) + encode_subscribe(ident, conn.channel)
                    if conn.marker is None:
                        conn.state = SUBSCRIBED
                        _send_small(sock, out)
                        return True
                    conn.state = WAIT_CONFIRM
                    _send_small(sock, out + encode_publish(ident, conn.channel, conn.marker))
                elif (
                    conn.state in (WAIT_CONFIRM, SUBSCRIBED)
                    and isinstance(frame, Publish)
                    and frame.channel == conn.channel
                ):
                    if conn.state == SUBSCRIBED or frame.payload == conn.marker:
                        conn.marker = frame.payload
                        return True
                    if self.shared_channels:
                        continue  # another connection's marker
                    raise BenchError(f"unexpected message during the handshake: {frame!r}")
                else:
                    raise BenchError(f"unexpected frame during the handshake: {frame!r}")
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return False

    def close(self, conn: _Conn) -> None:
        """Close with RST; closing the only descriptor also drops it from epoll."""
        del self.conns[conn.fd]
        with contextlib.suppress(OSError):
            set_linger_reset(conn.sock)
        conn.sock.close()

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        self.epoll.close()


def _send_small(sock: socket.socket, data: bytes) -> None:
    """A few hundred bytes into a fresh socket's empty buffer: one send suffices;
    the rare partial send (TLS) is finished blocking."""
    try:
        n = sock.send(data)
    except (BlockingIOError, ssl.SSLWantWriteError):
        n = 0
    if n < len(data):
        sock.setblocking(True)
        sock.sendall(data[n:])
        sock.setblocking(False)


def run_connect(target: Target, *, concurrency: int, duration: float) -> dict[str, Any]:
    """Complete handshakes back to back, ``concurrency`` at a time, for ``duration`` s."""
    hs = Handshaker(target)
    channels = [target.slot_channel(i) for i in range(concurrency)]
    try:
        t0 = time.monotonic()
        deadline = t0 + duration
        count = 0
        t_last = t0
        live: dict[bytes, _Conn] = {}
        for ch in channels:
            live[ch] = hs.start(ch, b"handshake:%d" % count)
        while live:
            now = time.monotonic()
            for conn in hs.step(1.0):
                count += 1
                hs.close(conn)
                del live[conn.channel]
                t_last = time.monotonic()
                if t_last < deadline:
                    live[conn.channel] = hs.start(conn.channel, b"handshake:%d" % count)
            for conn in live.values():
                if now - conn.started > HANDSHAKE_TIMEOUT_S:
                    raise BenchError(f"a handshake did not complete within {HANDSHAKE_TIMEOUT_S} s")
    finally:
        hs.shutdown()
    elapsed = t_last - t0
    return {
        "handshakes": count,
        "concurrency": concurrency,
        "handshakes_per_s": round(count / elapsed) if elapsed > 0 else 0,
        "mean_ms": round(elapsed / count * concurrency * 1000, 3) if count else None,
    }


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            return new
        except (ValueError, OSError):
            pass
    return soft


def find_listener_pid(port: int) -> int | None:
    """The local process listening on ``port``, from /proc; None if unknown."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            continue
    if not inodes:
        return None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def run_idle(
    target: Target, *, connections: int, broker_pid: int | None, in_flight: int = 64, settle: float = SETTLE_S
) -> dict[str, Any]:
    """Open ``connections`` authenticated, subscribed connections and leave them idle;
    report how much the broker's RSS grew per connection."""
    limit = raise_open_files_limit()
    if connections + 64 > limit:
        raise BenchError(f"{connections} connections need more open files than RLIMIT_NOFILE allows ({limit})")
    rss_before = rss_bytes(broker_pid) if broker_pid else None
    hs = Handshaker(target)
    channel = target.channel
    conns: list[_Conn] = []
    try:
        t0 = time.monotonic()
        pending = 0
        started = 0
        while started < connections or pending:
            while started < connections and pending < in_flight:
                conns.append(hs.start(channel, None))
                started += 1
                pending += 1
            pending -= len(hs.step(1.0))
            if time.monotonic() - t0 > HANDSHAKE_TIMEOUT_S + connections / 100:
                raise BenchError(f"only {started - pending} of {connections} connections got through the handshake")
        t_connected = time.monotonic() - t0
        # Confirm every subscription: publish markers until each connection got one.
        # (Frames of different connections have no order at the broker, so one
        # marker may overtake a late SUBSCRIBE; the next marker catches it.)
        unconfirmed = {c.fd: c for c in conns}
        for c in conns:
            c.marker = None
        for rnd in range(CONFIRM_ROUNDS):
            marker = b"idle:%d" % rnd
            _send_small(conns[0].sock, encode_publish(target.ident, channel, marker))
            until = time.monotonic() + CONFIRM_WAIT_S
            while unconfirmed and time.monotonic() < until:
                for c in hs.step(0.1):
                    unconfirmed.pop(c.fd, None)
            if not unconfirmed:
                break
        if unconfirmed:
            raise BenchError(f"{len(unconfirmed)} of {connections} idle connections never received a message")
        time.sleep(settle)
        # Drain the markers that arrived after a connection was confirmed.
        hs.step(0)
        rss_after = rss_bytes(broker_pid) if broker_pid else None
    finally:
        hs.shutdown()
    result: dict[str, Any] = {
        "connections": connections,
        "connect_s": round(t_connected, 3),
        "broker_pid": broker_pid,
    }
    if rss_before is not None and rss_after is not None:
        result["rss_before_mib"] = round(rss_before / 2**20, 1)
        result["rss_after_mib"] = round(rss_after / 2**20, 1)
        result["kib_per_connection"] = round((rss_after - rss_before) / connections / 1024, 2)
    return result
