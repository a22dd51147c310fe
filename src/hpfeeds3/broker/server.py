"""Composition root: listeners, TLS, authenticator, router, bounded shutdown.

``serve(config, sockets=..., stop=...)`` is what the CLI and the tests call:
the edge (CLI) owns signals and the clock; tests pass pre-bound sockets and a
``stop`` event and use sub-second limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ..protocol import CLIENT_TO_BROKER
from . import metrics
from .auth import AccessKey, Authenticator, AuthUnavailable, WouldBlock, build_authenticator
from .config import BrokerConfig, ConfigError, Endpoint
from .connection import Connection
from .metrics import PublishStats
from .ratelimit import AuthFailureLimiter
from .reasons import CloseReason
from .router import Router

log = logging.getLogger("hpfeeds3.broker")

# Descriptors kept free for listeners, the auth store, logs and the exporter.
_RESERVED_FDS = 64
# Distinct channel lists whose byte sets are shared between connections.
_MAX_CHANNEL_SETS = 10_000
# An auth lookup that takes longer than this fails the AUTH (store unavailable).
AUTH_LOOKUP_TIMEOUT_S = 2.0


class Broker:
    """Shared state of one broker process: what every Connection reaches."""

    def __init__(self, config: BrokerConfig, authenticator: Authenticator, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.authenticator = authenticator
        self.loop = loop
        self.router = Router()
        self.auth_limiter = AuthFailureLimiter(config.auth_limits)
        self.name_bytes = config.name.encode("utf-8")[:255]
        self.frame_limits = config.limits.frame_limits()
        # Max frame length by opcode, built once and shared by every connection.
        self.frame_table = self.frame_limits.table(CLIENT_TO_BROKER)
        self.send_hard_bytes = config.limits.send_buffer_hard_bytes
        self.max_connections = config.limits.max_connections
        self.connections: set[Connection] = set()
        self.by_ident: dict[str, set[Connection]] = {}
        self._channel_sets: dict[tuple[str, ...], frozenset[bytes]] = {}
        self.unauthenticated = 0
        self.state = "starting"  # starting | serving | stopping
        self.backplane: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Counts of closed connections, so counters never go backwards.
        self.retired_publish: dict[tuple[str, str], PublishStats] = {}
        self.retired_send_fill: dict[str, int] = {}
        self.retired_recv_fill: dict[str, int] = {}
        self.retired_total_recv = 0
        self.retired_total_sent = 0

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz: 200 while serving (``degraded`` while a cluster link is down), else 503."""
        body: dict[str, Any] = {
            "status": self.state,
            "name": self.config.name,
            "connections": len(self.connections),
        }
        if self.backplane is not None:
            body["cluster"] = self.backplane.status
            if self.state == "serving" and not self.backplane.connected:
                body["status"] = "degraded"
        return (200 if self.state == "serving" else 503), body

    # --- called by connections ---------------------------------------------------

    def channel_set(self, channels: tuple[str, ...]) -> frozenset[bytes]:
        """The channels of a key as the bytes the hot path compares, one shared set per distinct list."""
        found = self._channel_sets.get(channels)
        if found is None:
            if len(self._channel_sets) >= _MAX_CHANNEL_SETS:
                self._channel_sets.clear()
            found = self._channel_sets[channels] = frozenset(c.encode("utf-8") for c in channels)
        return found

    @property
    def task_count(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in a connection task", exc_info=task.exception())

    def lookup_now(self, ident: str) -> AccessKey | None:
        """The key without waiting, or ``WouldBlock`` (then use ``lookup``)."""
        now = getattr(self.authenticator, "lookup_now", None)
        if now is None:
            raise WouldBlock
        try:
            return now(ident)  # type: ignore[no-any-return]
        except (WouldBlock, AuthUnavailable):
            raise
        except Exception as e:
            log.exception("auth lookup for %r failed", ident)
            raise AuthUnavailable(str(e)) from e

    async def lookup(self, ident: str) -> AccessKey | None:
        try:
            # asyncio.timeout, not wait_for: no extra task per AUTH.
            async with asyncio.timeout(AUTH_LOOKUP_TIMEOUT_S):
                return await self.authenticator.lookup(ident)
        except TimeoutError as e:
            raise AuthUnavailable(f"lookup took longer than {AUTH_LOOKUP_TIMEOUT_S:g} s") from e
        except AuthUnavailable:
            raise
        except Exception as e:
            log.exception("auth lookup for %r failed", ident)
            raise AuthUnavailable(str(e)) from e

    def by_ident_add(self, conn: Connection) -> None:
        assert conn.ident is not None
        self.by_ident.setdefault(conn.ident, set()).add(conn)

    def by_ident_discard(self, conn: Connection) -> None:
        assert conn.ident is not None
        group = self.by_ident.get(conn.ident)
        if group is not None:
            group.discard(conn)
            if not group:
                del self.by_ident[conn.ident]

    def retire(self, conn: Connection) -> None:
        """Fold a closed connection's counts into the totals."""
        self.retired_total_recv += conn.received_bytes
        self.retired_total_sent += conn.sent_bytes
        ident = conn.ident
        if ident is None:
            return
        self.retired_send_fill[ident] = self.retired_send_fill.get(ident, 0) + conn.sent_bytes
        self.retired_recv_fill[ident] = self.retired_recv_fill.get(ident, 0) + conn.received_bytes
        for chan, st in conn.publish_stats.items():
            key = (ident, chan.decode("utf-8", "backslashreplace"))
            if key not in self.retired_publish:
                self.retired_publish[key] = PublishStats()
            self.retired_publish[key].merge(st)

    # --- revocation ----------------------------------------------------------------

    async def recheck(self, idents: set[str] | None) -> None:
        """Re-read the keys of live sessions after the store changed.

        A removed key or a rotated secret closes that ident's connections; a
        channel taken away unsubscribes it (and stops publishes to it).
        ``None`` means "anything may have changed": every live ident is checked.
        """
        targets = list(self.by_ident) if idents is None else [i for i in idents if i in self.by_ident]
        for ident in targets:
            try:
                key = await self.lookup(ident)
            except AuthUnavailable:
                continue  # keep sessions while the store cannot answer
            for conn in list(self.by_ident.get(ident, ())):
                self._apply_change(conn, key)

    def _apply_change(self, conn: Connection, key: AccessKey | None) -> None:
        if key is None or key.secret != conn.secret_seen:
            why = "key removed" if key is None else "secret rotated"
            log.warning(
                "revoking %s (%s): %s",
                conn.peer,
                conn.ident,
                why,
                extra={"event": "revoked", "peer": conn.peer, "ident": conn.ident, "reason": "revoked"},
            )
            metrics.REVOCATIONS.labels("closed").inc()
            conn.close(CloseReason.REVOKED, f"access key for {conn.ident} was {why.split()[-1]}")
            return
        old_sub = conn.subchans
        conn.apply_key(key)
        lost = set(old_sub - conn.subchans) & conn.subscriptions
        if lost:
            log.warning(
                "unsubscribing %s (%s) from revoked channel(s) %s",
                conn.peer,
                conn.ident,
                ", ".join(sorted(c.decode("utf-8", "backslashreplace") for c in lost)),
                extra={"event": "revoked", "peer": conn.peer, "ident": conn.ident, "reason": "channel_revoked"},
            )
            metrics.REVOCATIONS.labels("unsubscribed").inc()
            conn.unsubscribe_channels(lost)

    # --- shutdown ----------------------------------------------------------------------

    async def drain_and_close(self, drain_s: float) -> None:
        """Stop reading, flush queued output for at most ``drain_s``, then close all."""
        self.state = "stopping"
        for conn in list(self.connections):
            t = conn.transport
            if t is not None and not t.is_closing():
                with contextlib.suppress(Exception):
                    t.pause_reading()
        deadline = self.loop.time() + drain_s
        while self.loop.time() < deadline:
            if not any(c.write_buffer_size() for c in self.connections):
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close(CloseReason.SHUTDOWN, None, abort=conn.write_buffer_size() > 0)
        # Let connection_lost callbacks run.
        for _ in range(20):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()


# --- listeners and TLS -------------------------------------------------------------------


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS certificate {cert!r} / key {key!r}: {e}") from e
    return ctx


async def _watch_tls(ctx: ssl.SSLContext, cert: str, key: str, stop: asyncio.Event) -> None:
    """Reload certificate and key when their files change; live connections keep theirs."""
    from watchfiles import awatch

    paths = {os.path.abspath(cert), os.path.abspath(key)}
    dirs = {os.path.dirname(p) for p in paths}
    try:
        async for _ in awatch(*dirs, stop_event=stop, debounce=300, step=50, watch_filter=lambda _c, p: p in paths):
            try:
                ctx.load_cert_chain(cert, key)
                log.info("reloaded TLS certificate %s", cert)
            except (OSError, ssl.SSLError) as e:
                # Cert and key are often replaced one after the other: the pair
                # may not match for a moment. Keep the old one and wait.
                log.warning("keeping the previous TLS certificate: cannot load %s / %s: %s", cert, key, e)
    except Exception:
        log.exception("watching TLS files failed; certificate changes need a restart")


def bind_socket(endpoint: Endpoint, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if endpoint.device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, endpoint.device.encode()[:15] + b"\0")
        # Accepted sockets inherit these from the listener (Linux): no per-connection syscalls.
        set_keepalive(sock)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        why = "address already in use" if e.errno == 98 else e.strerror or str(e)
        raise ConfigError(f"cannot listen on {endpoint.describe()}: {why}") from e
    sock.setblocking(False)
    return sock


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive: a peer that vanished (no FIN, no RST) is noticed within about 2 minutes."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


def raise_nofile_limit(max_connections: int) -> int:
    """Raise the soft open-files limit to the hard one; return the effective connection cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(1, min(max_connections, soft - _RESERVED_FDS))


async def serve(
    config: BrokerConfig,
    *,
    sockets: Sequence[tuple[Endpoint, socket.socket]] | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[Broker], None] | None = None,
    authenticator: Authenticator | None = None,
) -> None:
    """Run a broker until ``stop`` is set; then shut down within the drain time."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    auth = authenticator or build_authenticator(config.auth, poll_s=config.limits.revocation_poll_s)
    await auth.start()
    broker = Broker(config, auth, loop)
    broker.max_connections = raise_nofile_limit(config.limits.max_connections)
    cleanups: list[Callable[[], Awaitable[None] | None]] = [auth.close]

    from .. import __version__

    metrics.BUILD_INFO.labels(__version__).set(1)
    cleanups.append(metrics.register_broker(broker))  # type: ignore[arg-type]
    watch_stop = asyncio.Event()

    servers: list[asyncio.base_events.Server] = []
    try:
        bound = (
            list(sockets)
            if sockets is not None
            else [(ep, bind_socket(ep, reuse_port=config.reuse_port)) for ep in config.endpoints]
        )
        for endpoint, sock in bound:
            ctx = None
            if endpoint.kind == "tls":
                assert endpoint.cert and endpoint.key
                ctx = make_tls_context(endpoint.cert, endpoint.key)
                broker.spawn(_watch_tls(ctx, endpoint.cert, endpoint.key, watch_stop))
            server = await loop.create_server(
                lambda: Connection(broker),
                sock=sock,
                ssl=ctx,
                ssl_handshake_timeout=config.limits.tls_handshake_timeout_s if ctx else None,
                backlog=1024,
            )
            servers.append(server)
            host, port = sock.getsockname()[:2]
            log.info("listening on %s://%s:%s", endpoint.kind, f"[{host}]" if ":" in host else host, port)

        if config.cluster:
            from .backplane.nats import NatsBackplane

            backplane = NatsBackplane(
                config.cluster,
                broker.router,
                max_frame_bytes=broker.frame_limits.max_publish_frame_bytes,
                name=config.name,
            )
            await backplane.start()
            broker.backplane = backplane
            cleanups.append(backplane.close)

        if config.exporter is not None:
            from .exporter import start_exporter

            cleanups.append(await start_exporter(config.exporter[0], config.exporter[1], broker.health))
            log.info("metrics on http://%s:%s/metrics", *config.exporter)

        broker.spawn(_watch_auth_changes(broker, auth))
        log.info(
            "broker %r serving; auth %r; at most %d connections",
            config.name,
            auth,
            broker.max_connections,
        )
        broker.state = "serving"
        # Everything allocated so far lives as long as the process: keep it out
        # of the cyclic GC's generations so full collections stay short.
        gc.collect()
        gc.freeze()
        if started is not None:
            started(broker)
        await stop.wait()
        log.info("shutting down: draining for at most %g s", config.limits.shutdown_drain_s)
    finally:
        broker.state = "stopping"
        watch_stop.set()
        for server in servers:
            server.close()
        await broker.drain_and_close(config.limits.shutdown_drain_s)
        for cleanup in reversed(cleanups):
            result = cleanup()
            if result is not None:
                with contextlib.suppress(Exception):
                    await result
        log.info("broker stopped")


async def _watch_auth_changes(broker: Broker, auth: Authenticator) -> None:
    """Feed the store's change notifications into ``Broker.recheck`` (revocation).

    A backend that can tell has ``changes()``: an async iterator of changed
    idents (``None``: anything may have changed)."""
    changes = getattr(auth, "changes", None)
    if changes is None:
        return
    async for idents in changes():
        await broker.recheck(idents)
