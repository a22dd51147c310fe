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
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from .config import ConfigError

log = logging.getLogger(__name__)

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
    # handle_signals=False: the broker owns SIGTERM/SIGINT.
    # access_log=None: one log line per scrape would drown the connection events.
    runner = web.AppRunner(
        make_app(health, registry, executor),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        await web.TCPSite(runner, host or None, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        executor.shutdown(wait=False)
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--exporter {shown}: cannot listen: {reason}") from None
    exporter = Exporter(runner, executor)
    log.debug("exporter bound to %s", exporter.addresses)
    return exporter
