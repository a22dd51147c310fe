"""The Prometheus exporter: ``/metrics`` and ``/healthz`` over HTTP (``--exporter HOST:PORT``).

Contract:

- ``/metrics`` is prometheus_client's default registry in the Prometheus text
  format (``generate_latest`` / ``CONTENT_TYPE_LATEST``), so every name and label
  the broker registers appears exactly as prometheus_client writes it.
- ``/healthz`` answers the status code and small JSON body that the broker's
  ``health()`` callback returns (200 while serving, 503 while starting or
  shutting down, ...). The callback runs on the event loop, so it may read the
  broker's state without locks; it must be quick and must not raise.
- The HTTP server is aiohttp on the broker's own event loop (uvloop or not):
  no second server framework, no hand-written HTTP parsing.
- Scrapes never stall the broker's hot path for the length of a collection:
  ``generate_latest`` (and gzip, when the scraper asks for it) runs on one
  dedicated worker thread. prometheus_client is thread-safe (each metric and
  each child holds its own lock), so the loop keeps bumping counters while the
  thread reads them; the GIL is handed back every few milliseconds instead of
  being held for a whole collection of a large registry. One thread, so scrapes
  are serialised and never compete with the default executor (auth lookups).
- A port that cannot be bound is the operator's mistake: ``ConfigError`` naming
  the address, raised before the broker reports itself as serving.
- The broker's HTTP listeners (this one and the console's) run in the
  broker's process, so whatever their ports receive must not take the
  descriptors its clients need: ``start_site`` holds at most
  ``max_connections`` at once (counted from accept, TLS handshake included;
  the caps are kept out of the clients' share of the open-files limit,
  ``http_reserved_fds``), closes a connection whose request headers have not
  arrived ``HTTP_HEADER_TIMEOUT_S`` after accept, and an idle keep-alive
  connection after ``HTTP_KEEPALIVE_S`` (aiohttp's default is an hour).
  Past the cap a new connection is closed at once, counted in
  ``hpfeeds_broker_limit_rejections_total{limit="<name>_connections"}``.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import gzip
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from . import metrics
from .config import ConfigError

log = logging.getLogger(__name__)

# Connections the exporter holds at once (a few Prometheus servers scrape it).
EXPORTER_MAX_CONNECTIONS = 16
# Connections the console holds at once (browser tabs open about six each, and scripts).
CONSOLE_MAX_CONNECTIONS = 64
# A connection's request headers must have arrived this long after accept
# (its TLS handshake included), or it is closed.
HTTP_HEADER_TIMEOUT_S = 10
# An idle keep-alive connection is closed after this long.
HTTP_KEEPALIVE_S = 5.0
# How often a listener at its cap says so in the log.
_CAP_LOG_INTERVAL_S = 60.0

HealthCallback = Callable[[], tuple[int, dict[str, Any]]]

# Grace given to an in-flight scrape when the exporter stops.
SHUTDOWN_TIMEOUT_S = 2.0

_INDEX = b"""<html><head><title>hpfeeds3 broker</title></head><body>
<h1>hpfeeds3 broker</h1><p><a href="/metrics">/metrics</a> <a href="/healthz">/healthz</a></p>
</body></html>
"""


class Exporter:
    """A running exporter. Calling it (``await stop()``) stops it; idempotent.

    ``addresses`` lists the bound ``(host, port)`` pairs, so a caller that
    asked for port 0 can learn the port the kernel chose.
    """

    def __init__(self, runner: web.AppRunner, executor: ThreadPoolExecutor) -> None:
        self._runner = runner
        self._executor = executor
        self._stopped = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(a[0], a[1]) for a in self._runner.addresses]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def __call__(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._runner.cleanup()
        finally:
            # wait=False: a collection in progress finishes on its own; nothing waits for it.
            self._executor.shutdown(wait=False, cancel_futures=True)


def http_reserved_fds(exporter: bool, console: bool) -> int:
    """Descriptors kept for the HTTP listeners that are on, out of the clients' share."""
    return (EXPORTER_MAX_CONNECTIONS if exporter else 0) + (CONSOLE_MAX_CONNECTIONS if console else 0)


class _Listener:
    """One HTTP listener's open connections and cap."""

    def __init__(self, name: str, runner: web.AppRunner, max_connections: int, ssl_context: Any) -> None:
        self.name = name
        self.runner = runner
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self.open: set[_Guarded] = set()
        self.refused = metrics.LIMIT_REJECTIONS.labels(metrics.Limit(f"{name}_connections").value)
        self.logged = -_CAP_LOG_INTERVAL_S

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)


class _Guarded(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol: counts the connection
    from accept, refuses it past the cap, runs its TLS handshake, and closes it
    if its request headers do not arrive in time.

    TLS: the handshake is asyncio's own ``SSLProtocol`` (the one ``start_tls``
    uses), put on the accepted transport here, in ``connection_made``, so no
    byte can reach this protocol before it (uvloop starts reading right after
    ``connection_made``, whatever it paused). It calls ``connection_made`` again
    with the decrypted transport once the handshake is done."""

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.inner: asyncio.Protocol | None = None
        self.raw: asyncio.Transport | None = None  # the accepted socket's transport
        self.deadline: asyncio.TimerHandle | None = None
        self.handshaking = False
        self.tail = b""  # the last bytes of the headers so far (their end may span two reads)

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # a stream transport (uvloop's are not subclasses)
        if self.handshaking:  # the TLS handshake is done: ``transport`` is the decrypted one
            self.handshaking = False
            self._start(transport)
            return
        listener = self.listener
        self.raw = transport
        loop = asyncio.get_running_loop()
        if len(listener.open) >= listener.max_connections:
            listener.refused.inc()
            if loop.time() - listener.logged >= _CAP_LOG_INTERVAL_S:
                listener.logged = loop.time()
                log.warning(
                    "%s: %d connections open, refusing more (more refusals counted in "
                    "hpfeeds_broker_limit_rejections_total, logged again in %g s)",
                    listener.name,
                    len(listener.open),
                    _CAP_LOG_INTERVAL_S,
                )
            transport.abort()  # the descriptor back at once
            return
        listener.open.add(self)
        self.deadline = loop.call_later(HTTP_HEADER_TIMEOUT_S, self._expired)
        if listener.ssl_context is None:
            self._start(transport)
            return
        self.handshaking = True
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        tls = asyncio.sslproto.SSLProtocol(
            loop, self, listener.ssl_context, waiter, server_side=True, ssl_handshake_timeout=HTTP_HEADER_TIMEOUT_S
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        failed = waiter.cancelled() or waiter.exception() is not None
        # A connection lost during the handshake (aborted at the deadline, or the
        # peer left) completes the waiter without an error: still handshaking.
        if failed or self.handshaking:
            self.handshaking = False
            self._forget()

    def _start(self, transport: asyncio.Transport) -> None:
        server = self.listener.runner.server
        assert server is not None
        self.inner = server()
        self.inner.connection_made(transport)

    def _forget(self) -> None:
        self.listener.open.discard(self)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if self.raw is not None:
            self.raw.abort()

    def data_received(self, data: bytes) -> None:
        if self.deadline is not None:
            seen = self.tail + data
            if b"\r\n\r\n" in seen:
                self.deadline.cancel()
                self.deadline = None
            else:
                self.tail = seen[-3:]
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self.inner is not None:
            self.inner.connection_lost(exc)


class _GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a ``_Listener`` (its TLS included)."""

    def __init__(self, runner: web.AppRunner, host: str | None, port: int, listener: _Listener) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self._listener = listener

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._listener, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def make_runner(app: web.Application, shutdown_timeout_s: float) -> web.AppRunner:
    """aiohttp's runner for a broker HTTP listener: no signal handling (the broker
    owns SIGTERM), no access log (a line per request would drown the connection
    events), a short keep-alive."""
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=HTTP_KEEPALIVE_S,
    )


async def start_site(
    runner: web.AppRunner, name: str, host: str, port: int, *, max_connections: int, ssl_context: Any = None
) -> None:
    """Listen on ``host:port`` for ``runner`` through a ``_Listener`` (see the module's contract); OSError if not."""
    listener = _Listener(name, runner, max_connections, ssl_context)
    await _GuardedSite(runner, host or None, port, listener).start()


def _render(registry: CollectorRegistry, compress: bool) -> bytes:
    body = generate_latest(registry)
    return gzip.compress(body, compresslevel=6) if compress else body


def _wants_gzip(request: web.Request) -> bool:
    accept = request.headers.get("Accept-Encoding", "")
    return any(part.split(";")[0].strip().lower() == "gzip" for part in accept.split(","))


def make_app(health: HealthCallback, registry: CollectorRegistry, executor: ThreadPoolExecutor) -> web.Application:
    """The aiohttp application (separate from binding, so it can be tested alone)."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        compress = _wants_gzip(request)
        body = await asyncio.get_running_loop().run_in_executor(executor, _render, registry, compress)
        response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if compress:
            response.headers["Content-Encoding"] = "gzip"
        return response

    async def healthz(request: web.Request) -> web.StreamResponse:
        try:
            status, payload = health()
        except Exception:  # a bug in the callback must not look like a healthy broker
            log.exception("health callback failed")
            status, payload = 500, {"status": "error"}
        return web.Response(
            status=status,
            body=json.dumps(payload, separators=(",", ":"), default=str).encode() + b"\n",
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def index(request: web.Request) -> web.StreamResponse:
        return web.Response(body=_INDEX, content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    return app


async def start_exporter(
    host: str,
    port: int,
    health: HealthCallback,
    *,
    registry: CollectorRegistry = REGISTRY,
) -> Exporter:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port``; return the async stop function.

    Raises ``ConfigError`` naming the address when it cannot be bound.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpfeeds-exporter")
    runner = make_runner(make_app(health, registry, executor), SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        await start_site(runner, "exporter", host, port, max_connections=EXPORTER_MAX_CONNECTIONS)
    except OSError as exc:
        await runner.cleanup()
        executor.shutdown(wait=False)
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--exporter {shown}: cannot listen: {reason}") from None
    exporter = Exporter(runner, executor)
    log.debug("exporter bound to %s", exporter.addresses)
    return exporter
