"""The exporter on its own: /metrics, /healthz, bind errors, stop; no broker needed."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily

from hpfeeds3.broker.auth.env import EnvStore
from hpfeeds3.broker.config import BrokerConfig, ConfigError
from hpfeeds3.broker.exporter import start_exporter
from hpfeeds3.broker.state import Broker


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def aget(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, url, headers)


def serving() -> tuple[int, dict]:
    return 200, {"status": "serving", "connections": 3}


def test_metrics_serves_the_registry_in_prometheus_text_format() -> None:
    registry = CollectorRegistry()
    Counter("hpfeeds_broker_connection_made", "Connections accepted", registry=registry).inc(7)

    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, serving, registry=registry)
        try:
            status, headers, body = await aget(f"http://127.0.0.1:{stop.port}/metrics")
        finally:
            await stop()
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert b"hpfeeds_broker_connection_made_total 7.0\n" in body

    uvloop.run(main())


def test_metrics_uses_the_default_registry_unless_told_otherwise() -> None:
    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, serving)
        try:
            status, _, body = await aget(f"http://127.0.0.1:{stop.port}/metrics")
        finally:
            await stop()
        assert status == 200
        assert b"python_info{" in body  # registered on prometheus_client's default REGISTRY

    asyncio.run(main())


def test_metrics_are_gzipped_when_the_scraper_asks() -> None:
    registry = CollectorRegistry()
    Counter("hpfeeds_broker_slow_consumers", "cut", registry=registry)

    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, serving, registry=registry)
        try:
            status, headers, body = await aget(
                f"http://127.0.0.1:{stop.port}/metrics", {"Accept-Encoding": "gzip, deflate"}
            )
        finally:
            await stop()
        assert status == 200
        assert headers["Content-Encoding"] == "gzip"
        assert b"hpfeeds_broker_slow_consumers_total 0.0" in gzip.decompress(body)

    uvloop.run(main())


def test_collection_runs_off_the_event_loop_thread() -> None:
    seen: list[str] = []

    class Probe:
        def collect(self):
            seen.append(threading.current_thread().name)
            yield CounterMetricFamily("probe", "where collection runs", value=1)

    registry = CollectorRegistry()
    registry.register(Probe())

    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, serving, registry=registry)
        try:
            seen.clear()  # register() may have collected once to learn the names
            status, _, _ = await aget(f"http://127.0.0.1:{stop.port}/metrics")
        finally:
            await stop()
        assert status == 200

    uvloop.run(main())
    assert seen and all(name.startswith("hpfeeds-exporter") for name in seen)


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (200, {"status": "serving", "connections": 0}),
        (503, {"status": "starting"}),
        (503, {"status": "stopping"}),
        (200, {"status": "degraded", "cluster": "down"}),
    ],
)
def test_healthz_answers_what_the_broker_says(status: int, payload: dict) -> None:
    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, lambda: (status, payload))
        try:
            got = await aget(f"http://127.0.0.1:{stop.port}/healthz")
        finally:
            await stop()
        assert got[0] == status
        assert got[1]["Content-Type"].startswith("application/json")
        assert json.loads(got[2]) == payload

    uvloop.run(main())


@pytest.mark.parametrize(("state", "status"), [("starting", 503), ("serving", 200), ("stopping", 503)])
def test_healthz_answers_the_brokers_own_health_in_each_state(state: str, status: int) -> None:
    """The broker's real callback; a new broker is ``starting`` until ``serve`` has
    its listeners (tests/ops/test_shutdown.py sees ``stopping`` on a real process)."""

    async def main() -> None:
        broker = Broker(BrokerConfig(name="health"), EnvStore({}), asyncio.get_running_loop())
        assert broker.state == "starting"
        broker.state = state
        stop = await start_exporter("127.0.0.1", 0, broker.health)
        try:
            got = await aget(f"http://127.0.0.1:{stop.port}/healthz")
        finally:
            await stop()
        assert got[0] == status
        assert json.loads(got[2]) == {"status": state, "name": "health", "connections": 0}

    uvloop.run(main())


def test_healthz_is_500_when_the_callback_fails() -> None:
    def broken() -> tuple[int, dict]:
        raise RuntimeError("bug")

    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, broken)
        try:
            status, _, body = await aget(f"http://127.0.0.1:{stop.port}/healthz")
        finally:
            await stop()
        assert status == 500
        assert json.loads(body)["status"] == "error"

    asyncio.run(main())


def test_unknown_path_is_404() -> None:
    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, serving)
        try:
            status, _, _ = await aget(f"http://127.0.0.1:{stop.port}/nope")
        finally:
            await stop()
        assert status == 404

    asyncio.run(main())


def test_port_in_use_is_a_config_error_naming_the_address() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def main() -> None:
        with pytest.raises(ConfigError, match=rf"--exporter 127\.0\.0\.1:{port}: cannot listen"):
            await start_exporter("127.0.0.1", port, serving)

    try:
        uvloop.run(main())
    finally:
        holder.close()


def test_unknown_host_is_a_config_error() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match=r"--exporter no-such-host\.invalid:9431"):
            await start_exporter("no-such-host.invalid", 9431, serving)

    asyncio.run(main())


def test_stop_frees_the_port_and_is_idempotent() -> None:
    async def main() -> None:
        stop = await start_exporter("127.0.0.1", 0, serving)
        port = stop.port
        await stop()
        await stop()
        with pytest.raises(OSError):
            await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
        # The same address can be bound again at once (a restart).
        again = await start_exporter("127.0.0.1", port, serving)
        await again()

    uvloop.run(main())
