"""The broker's exporter, read as a test reads it: ``/metrics`` samples and ``/healthz``.

``scrape(port)`` gives {(name, '{labels}'): value} with the label text as
exposed (prometheus_client sorts label names); ``metric`` picks one sample
(0 when absent), ``metric_sum`` adds a name's samples over all labels.
Counts that change after the fact (a close is counted once its socket is
gone) are read through ``wait_metric``, a bounded loop.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from tests.support.broker import http_get

Samples = dict[tuple[str, str], float]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(port: int) -> Samples:
    """``/metrics`` as {(name, '{labels}'): value}."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert status == 200, (status, body[:200])
    out: Samples = {}
    for line in body.decode().splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def scrape_flat(port: int) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}, a sample's text as exposed."""
    return {name + labels: value for (name, labels), value in scrape(port).items()}


def metric(samples: Samples, name: str, **labels: str) -> float:
    key = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    return samples.get((name, key), 0.0)


def metric_sum(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def wait_metric(port: int, done: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrape ``/metrics`` until ``done(samples)`` or the timeout; returns the last samples.

    A close is counted once its socket is gone, after the linger that follows
    an ERROR: counts of closes are read through this, not at once."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def wait_subscribed(port: int, ident: str, channel: str, n: int, timeout: float = 10.0) -> None:
    """Instead of sleeping: until the broker's /metrics (exporter ``port``) counts ``n``
    subscriptions of ``ident`` to ``channel``, each in place in the router."""

    def counted(samples: Samples) -> float:
        return metric(samples, "hpfeeds_broker_subscriptions", chan=channel, ident=ident)  # as exposed: sorted

    samples = wait_metric(port, lambda s: counted(s) == n, timeout)
    assert counted(samples) == n, f"{counted(samples)} subscriptions of {ident} to {channel}, not {n}"


def healthz(port: int) -> dict[str, Any]:
    """The exporter's ``/healthz`` body (whatever its status: 503 while degraded or stopping)."""
    _, body = http_get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    return json.loads(body)
