"""The Grafana dashboard and Prometheus config agree with what a live broker exports.

Every metric name and label that a dashboard query uses must be on a real
broker's /metrics after ordinary traffic (authenticate, subscribe, publish,
a denial, a failed AUTH, an oversized frame, closes), so a renamed metric
breaks this test instead of a graph.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # PyYAML, in the [test] extra: missing, the module fails rather than skips
from prometheus_client.parser import text_string_to_metric_families

from hpfeeds3.protocol import OP_PUBLISH, Publish, encode_publish, encode_subscribe
from tests.support.broker import confirm_subscribed

from .support import BROKER, REPO, TARGET_LABELS, RawClient, free_port, http_get, promql_names, running_broker

DASHBOARD = REPO / "deploy" / "grafana" / "hpfeeds3-dashboard.json"

# The reference broker's names (PROTOCOL.md) that dashboards in the wild use,
# and ours: the dashboard must show each of them.
REQUIRED_METRICS = {
    "hpfeeds_broker_client_connections",
    "hpfeeds_broker_connection_made_total",
    "hpfeeds_broker_connection_ready_total",
    "hpfeeds_broker_connection_error_total",
    "hpfeeds_broker_connection_lost_total",
    "hpfeeds_broker_subscriptions",
    "hpfeeds_broker_receive_publish_count_total",
    "hpfeeds_client_authenticated_connections",
    "hpfeeds_broker_deliveries_total",
    "hpfeeds_broker_received_bytes_total",
    "hpfeeds_broker_sent_bytes_total",
    "hpfeeds_broker_connections_closed_total",
    "hpfeeds_broker_auth_failures_total",
    "hpfeeds_broker_limit_rejections_total",
    "hpfeeds_broker_slow_consumers_total",
    "hpfeeds_broker_build_info",
}

# The spec's "Monitoring" section and the issue name these panels.
REQUIRED_PANELS = [
    "Active connections",
    "Active subscribers per channel",
    "Events / s per channel",
    "Events / s per ident",
    "Connect rate",
    "Error rate by category",
    "Closes by reason",
    "Slow consumers cut",
    "Bytes / s in and out",
]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, expression) for every panel target and every templating query."""

    def walk(panels: list[dict]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield f"variable ${var['name']}", query


def used_names(dashboard: dict) -> tuple[dict[str, set[str]], list[tuple[str, set[str], set[str]]]]:
    by_metric: dict[str, set[str]] = {}
    per_query = []
    for where, expr in queries(dashboard):
        metrics, labels = promql_names(expr)
        assert metrics, f"{where}: no metric found in {expr!r}"
        per_query.append((where, metrics, labels))
        for metric in metrics:
            by_metric.setdefault(metric, set()).add(where)
    return by_metric, per_query


# --- the dashboard file on its own ----------------------------------------------------


def test_promql_names_finds_metrics_and_labels() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (chan, le) (rate(hpfeeds_broker_receive_publish_size_bucket"
        '{instance=~"$instance", chan=~"a,b"}[$__rate_interval]))) / on(chan) group_left x_total offset 5m'
    )
    assert promql_names(expr) == (
        {"hpfeeds_broker_receive_publish_size_bucket", "x_total"},
        {"chan", "le", "instance"},
    )
    assert promql_names("label_values(hpfeeds_broker_subscriptions, chan)") == (
        {"hpfeeds_broker_subscriptions"},
        {"chan"},
    )


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            # One datasource variable: the same file works imported by hand and provisioned.
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert "datasource" in names
    # No import-time inputs: a provisioned dashboard never substitutes ${DS_...}.
    assert "__inputs" not in dashboard
    assert "${DS_" not in DASHBOARD.read_text()


def test_dashboard_has_the_panels_operators_need() -> None:
    titles = {p["title"] for p in load_dashboard()["panels"]}
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    assert not missing, f"missing panels: {missing}"


def test_dashboard_shows_every_reference_and_hpfeeds3_metric() -> None:
    by_metric, _ = used_names(load_dashboard())
    missing = sorted(REQUIRED_METRICS - set(by_metric))
    assert not missing, f"metrics no panel shows: {missing}"


def test_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/hpfeeds3.yml").read_text())
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (provider_entry,) = provider["providers"]
    assert provider_entry["type"] == "file"
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    # How these files are wired together in the compose example is checked in
    # test_docker_files.py (it needs the compose parser).
    assert provider_entry["options"]["path"].startswith("/var/lib/grafana/dashboards")
    assert ds["url"].startswith("http://prometheus:")


# --- the dashboard against a live broker --------------------------------------------


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Sample name -> label names, from a broker that saw ordinary traffic."""
    cwd: Path = tmp_path_factory.mktemp("dashboard-broker")
    users = {
        "sensor": {"owner": "honeynet", "secret": "s3cret", "pubchans": ["cowrie.sessions"], "subchans": []},
        "collector": {"owner": "honeynet", "secret": "c0llect", "pubchans": [], "subchans": ["cowrie.sessions"]},
    }
    (cwd / "users.json").write_text(json.dumps(users))
    port, exporter = free_port(), free_port()
    argv = [str(BROKER), "--bind", f"127.0.0.1:{port}", "--auth", "users.json", "--exporter", f"127.0.0.1:{exporter}"]
    with running_broker(argv, cwd) as broker:
        broker.wait_ready(port, exporter_port=exporter)
        status, body = http_get(f"http://127.0.0.1:{exporter}/healthz")
        assert status == 200 and json.loads(body)["status"] == "serving", body

        with RawClient(port) as collector, RawClient(port) as sensor:
            collector.authenticate("collector", "c0llect")
            collector.send(encode_subscribe(b"collector", b"cowrie.sessions"))
            sensor.authenticate("sensor", "s3cret")
            confirm_subscribed(sensor, "cowrie.sessions", collector)
            for i in range(3):
                sensor.send(encode_publish(b"sensor", b"cowrie.sessions", b'{"n": %d}' % i))
            for _ in range(3):
                assert isinstance(collector.read_frame(), Publish)
            # A channel the sensor may not publish to: ERROR, connection stays open.
            sensor.send(encode_publish(b"sensor", b"dionaea.capture", b"x"))
            sensor.expect_error()
            # Gauges of live state (subscriptions, authenticated connections,
            # buffers) exist only while clients are connected: scrape now too.
            status, body = http_get(f"http://127.0.0.1:{exporter}/metrics")
            assert status == 200
            scrapes = [body.decode()]
        with RawClient(port) as intruder:  # wrong secret
            intruder.authenticate("sensor", "wrong")
            intruder.expect_error()
        with RawClient(port) as big:  # a PUBLISH header over the 1 MiB cap
            big.authenticate("sensor", "s3cret")
            big.send(struct.pack("!IB", 5 + 2 * 1024 * 1024, OP_PUBLISH))
            big.expect_error()

        deadline = time.monotonic() + 10
        while True:
            status, body = http_get(f"http://127.0.0.1:{exporter}/metrics")
            assert status == 200
            text = body.decode()
            if "hpfeeds_broker_connections_closed_total{" in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        scrapes.append(text)
        assert broker.stop() == 0, broker.log()

    samples: dict[str, set[str]] = {}
    for text in scrapes:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_metric_the_dashboard_queries_is_exported(live_metrics: dict[str, set[str]]) -> None:
    by_metric, _ = used_names(load_dashboard())
    missing = {m: sorted(where) for m, where in by_metric.items() if m not in live_metrics}
    assert not missing, f"dashboard queries metrics the broker does not export: {missing}"


def test_every_label_the_dashboard_uses_is_on_its_metrics(live_metrics: dict[str, set[str]]) -> None:
    _, per_query = used_names(load_dashboard())
    problems = []
    for where, metrics, labels in per_query:
        available = set().union(*(live_metrics.get(m, set()) for m in metrics))
        unknown = labels - available - TARGET_LABELS
        if unknown:
            problems.append(f"{where}: labels {sorted(unknown)} not on {sorted(metrics)}")
    assert not problems, "\n".join(problems)
