"""Prometheus metrics: the reference broker's names (existing dashboards keep
working) plus ours.

Hot-path rule: nothing here is touched per message. Connections count
publishes into plain ints on a ``PublishStats`` per (ident, channel) and the
``BrokerCollector`` turns live and retired counts into samples at scrape time.
Rare events (errors, refusals) use ordinary prometheus_client objects. The
four counted for every connection (made, ready and lost by ident, closed by
reason) are plain ints (``PlainCounter``, ``LabelCounter``), turned into samples at scrape
time: a reconnect storm brings thousands of idents at once, and a
prometheus_client child per ident (an object, a lock, a validated key) cost
each sensor's handshake more than the count; even a child found in a dict
cost a handshake six thousand instructions per count (its checks and its lock).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics import _use_created
from prometheus_client.registry import Collector

from .session import PublishStats, Refusal

if TYPE_CHECKING:
    from .state import Broker


class PlainCounter(Collector):
    """A counter kept as a plain int, turned into samples at scrape time: it scrapes
    as an unlabelled prometheus_client ``Counter`` would (``NAME_total``, ``NAME_created``)."""

    label: str | None = None

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0
        self.created = time.time()
        if registry is not None:
            registry.register(self)

    def inc(self) -> None:
        self.value += 1

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=[self.label] if self.label else None)

    def describe(self) -> Iterator[Any]:
        yield self._family()

    def collect(self) -> Iterator[Any]:
        family = self._family()
        family.add_metric([], self.value, created=self.created if _use_created else None)
        yield family


class LabelCounter(PlainCounter):
    """A counter by one label kept as plain ints: it scrapes as a prometheus_client
    ``Counter`` with that label would (``NAME_total`` and ``NAME_created`` per value).

    Counting is one dict update; the first count of a value also notes its
    creation time. The values are authenticated idents, "" or close reasons
    (never a client's choice), so the dict grows as prometheus_client's own
    children would. The exporter may collect on a worker thread: it reads a
    ``list(...)`` copy, made in one step under the GIL.
    """

    def __init__(
        self, name: str, documentation: str, label: str, registry: CollectorRegistry | None = REGISTRY
    ) -> None:
        self.label = label
        self.counts: dict[str, int] = {}
        self._created: dict[str, float] = {}
        super().__init__(name, documentation, registry)

    def inc(self, value: str) -> None:  # type: ignore[override]
        counts = self.counts
        n = counts.get(value)
        if n is None:
            self._created[value] = time.time()
            counts[value] = 1
        else:
            counts[value] = n + 1

    def collect(self) -> Iterator[Any]:
        family = self._family()
        created = self._created
        for value, n in list(self.counts.items()):
            family.add_metric([value], n, created=created.get(value) if _use_created else None)
        yield family


# --- the reference's metrics ----------------------------------------------

CONNECTION_MADE = PlainCounter("hpfeeds_broker_connection_made", "Number of connections established")
CONNECTION_READY = LabelCounter(
    "hpfeeds_broker_connection_ready", "Number of connections established + authenticated", "ident"
)
# ident is the *authenticated* ident or "" before AUTH: never a value a client chose.
CONNECTION_ERROR = Counter(
    "hpfeeds_broker_connection_error",
    "Number of connections that experienced a protocol error",
    ["ident", "category"],
)
CONNECTION_LOST = LabelCounter("hpfeeds_broker_connection_lost", "Number of connections lost", "ident")
SEND_BUFFER_DEADLINE_START = Counter(
    "hpfeeds_broker_connection_send_buffer_deadline_start",
    "High watermark was exceeded and this connection was put on a deadline timer",
    ["ident"],
)
SEND_BUFFER_DEADLINE_RECOVER = Counter(
    "hpfeeds_broker_connection_send_buffer_deadline_recover",
    "Buffer recovered to low watermark or better and deadline timer was cancelled",
    ["ident"],
)

# --- ours ---------------------------------------------------------------------

CONNECTIONS_CLOSED = LabelCounter("hpfeeds_broker_connections_closed", "Connections closed, by reason", "reason")
AUTH_FAILURES = Counter("hpfeeds_broker_auth_failures", "Failed authentications, by reason", ["reason"])
LIMIT_REJECTIONS = Counter("hpfeeds_broker_limit_rejections", "Frames or connections refused by a limit", ["limit"])


class Limit(StrEnum):
    """The label values of hpfeeds_broker_limit_rejections_total: one per limit that refuses."""

    MAX_MESSAGE_SIZE = "max_message_size"
    MAX_CONNECTIONS = "max_connections"
    MAX_UNAUTHENTICATED = "max_unauthenticated"
    MAX_UNAUTHENTICATED_PER_ADDRESS = "max_unauthenticated_per_address"
    MIN_RECEIVE_RATE = "min_receive_rate"
    MAX_PARTIAL_FRAMES = "max_partial_frames"
    PRE_AUTH_BUFFER = "pre_auth_buffer"
    TLS_HANDSHAKE_TIMEOUT = "tls_handshake_timeout"
    MAX_TLS_RECORDS_WITHOUT_DATA = "max_tls_records_without_data"
    MAX_SUBSCRIPTIONS = "max_subscriptions"
    MAX_DENIALS = "max_denials"
    AUTH_FAILURES = "auth_failures"
    CONSOLE_CONNECTIONS = "console_connections"  # the --admin listener's connection cap
    EXPORTER_CONNECTIONS = "exporter_connections"  # the --exporter listener's connection cap


def limit_rejected(limit: Limit) -> None:
    LIMIT_REJECTIONS.labels(limit.value).inc()


# What each refusal the session reports counts: (connection_error by its
# value, auth_failures reason, limit_rejections limit).
REFUSALS: dict[Refusal, tuple[bool, str | None, Limit | None]] = {
    Refusal.NO_PUB_PERMISSION: (True, None, None),
    Refusal.NO_SUB_PERMISSION: (True, None, None),
    Refusal.IDENT_MISMATCH_PUB: (True, None, None),
    Refusal.IDENT_MISMATCH_SUB: (True, None, None),
    Refusal.IDENT_MISMATCH_UNSUB: (True, None, None),
    Refusal.MAX_SUBSCRIPTIONS: (False, None, Limit.MAX_SUBSCRIPTIONS),
    Refusal.TOO_MANY_DENIALS: (False, None, Limit.MAX_DENIALS),
    Refusal.FIRST_NOT_AUTH: (True, None, None),
    Refusal.SECOND_AUTH: (True, None, None),
    # One auth_failures reason for an unknown ident and a wrong secret: /metrics
    # must not tell which idents exist.
    Refusal.AUTH_FAILED: (True, "auth_failed", None),
    Refusal.AUTH_UNAVAILABLE: (True, "store_unavailable", None),
    Refusal.AUTH_RATE_LIMITED: (True, "rate_limited", Limit.AUTH_FAILURES),
    Refusal.AUTH_TIMEOUT: (True, "timeout", None),
    Refusal.BAD_FRAME: (True, None, None),
    Refusal.FRAME_TOO_LARGE: (True, None, Limit.MAX_MESSAGE_SIZE),
}


def count_refusal(refusal: Refusal, ident: str | None) -> None:
    error, auth_reason, limit = REFUSALS[refusal]
    if error:
        CONNECTION_ERROR.labels(ident or "", refusal.value).inc()
    if auth_reason is not None:
        AUTH_FAILURES.labels(auth_reason).inc()
    if limit is not None:
        limit_rejected(limit)


SLOW_CONSUMERS = Counter("hpfeeds_broker_slow_consumers", "Subscribers cut because they could not keep up")
REVOCATIONS = Counter(
    "hpfeeds_broker_revocations", "Live sessions cut back after their key changed in the store", ["action"]
)
CONSOLE_LOGINS = Counter(
    "hpfeeds_broker_console_logins",
    "Console logins and bearer tokens checked, by result (ok, failed, blocked)",
    ["result"],
)
CONSOLE_CHANGES = Counter("hpfeeds_broker_console_changes", "Changes made through the operator console")
CLUSTER_LINK_UP = Gauge("hpfeeds_broker_cluster_link_up", "1 while the NATS cluster link is connected")
CLUSTER_UNFORWARDED = Counter(
    "hpfeeds_broker_cluster_unforwarded_messages",
    "Local messages not sent to other nodes: link_down, outbox_full (NATS not keeping up) or publish_failed",
    ["reason"],
)
CLUSTER_OUTBOX_BYTES = Gauge(
    "hpfeeds_broker_cluster_outbox_bytes", "Bytes of local messages queued for other nodes (bound: --cluster-outbox)"
)
CLUSTER_REJECTED = Counter(
    "hpfeeds_broker_cluster_rejected",
    "Messages from NATS dropped because they failed a check (not whole, well-formed PUBLISH frames of their "
    "subject's channel from a broker), by reason",
    ["reason"],
)
CLUSTER_LOST = Counter(
    "hpfeeds_broker_cluster_lost_messages",
    "Messages from other nodes missed by this node (gaps in their sequence numbers)",
)
BUILD_INFO = Gauge("hpfeeds_broker_build_info", "Build information", ["version"])

# Publish sizes are bucketed by bit length (powers of two); these are the
# reference's histogram buckets, all powers of two from 1 KiB to 4 MiB.
SIZE_BUCKETS = tuple(1 << n for n in range(10, 23))


def _histogram_buckets(stats: PublishStats) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for bound in SIZE_BUCKETS:
        k = bound.bit_length() - 1  # bound == 2**k
        out.append((str(float(bound)), float(sum(stats.bits[: k + 1]))))
    out.append(("+Inf", float(stats.count)))
    return out


class BrokerCollector(Collector):
    """Samples computed from the broker's live state at scrape time.

    The exporter may collect on a worker thread while the loop mutates these
    containers: every iteration goes over a ``list(...)`` copy, which CPython
    makes in one step under the GIL for builtin sets and dicts.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Any]:
        broker = self._broker
        conns = list(broker.connections)

        yield GaugeMetricFamily(
            "hpfeeds_broker_client_connections", "Number of clients connected to broker", value=len(conns)
        )
        yield GaugeMetricFamily(
            "hpfeeds_broker_unauthenticated_connections",
            "Connections that have not authenticated yet",
            value=broker.unauthenticated,
        )
        yield GaugeMetricFamily(
            "hpfeeds_broker_held_back_connections",
            "Connections accepted while the pre-auth pool was full of connections making progress, not started yet",
            value=len(broker.held_back),
        )
        yield GaugeMetricFamily(
            "hpfeeds_broker_pending_tasks",
            "Background tasks in flight (auth lookups, watchers)",
            value=broker.task_count,
        )

        authed: dict[tuple[str, str], int] = defaultdict(int)
        send_buf: dict[str, int] = defaultdict(int)
        recv_buf: dict[str, int] = defaultdict(int)
        send_fill: dict[str, int] = defaultdict(int, list(broker.retired_send_fill.items()))
        recv_fill: dict[str, int] = defaultdict(int, list(broker.retired_recv_fill.items()))
        publish: dict[tuple[str, str], PublishStats] = defaultdict(PublishStats)
        for key, st in list(broker.retired_publish.items()):
            publish[key].merge(st)
        subscriptions: dict[tuple[str, str], int] = defaultdict(int)
        total_recv = broker.retired_total_recv
        total_sent = broker.retired_total_sent
        for c in conns:
            total_recv += c.received_bytes
            total_sent += c.sent_bytes
            session = c.session
            ident = session.ident
            if ident is None:
                continue
            authed[(ident, session.owner)] += 1
            queued = c.write_buffer_size()
            send_buf[ident] += queued
            recv_buf[ident] += session.buffered
            send_fill[ident] += c.sent_bytes
            recv_fill[ident] += c.received_bytes
            for chan, st in list(session.publish_stats.items()):
                publish[(ident, _text(chan))].merge(st)
            for chan in list(session.subscriptions):
                subscriptions[(ident, _text(chan))] += 1

        g = GaugeMetricFamily(
            "hpfeeds_client_authenticated_connections", "Authenticated connections", labels=["ident", "owner"]
        )
        for (ident, owner), n in authed.items():
            g.add_metric([ident, owner or ""], n)
        yield g

        yield _gauge("hpfeeds_broker_connection_send_buffer_size", "Number of bytes queued for transmission", send_buf)
        yield _gauge(
            "hpfeeds_broker_connection_receive_buffer_size", "Number of bytes received but not yet parsed", recv_buf
        )
        yield _counter(
            "hpfeeds_broker_connection_receive_buffer_fill", "Number of bytes queued in the parsing buffer", recv_fill
        )
        yield _counter(
            "hpfeeds_broker_connection_send_buffer_fill", "Number of bytes queued in the send buffer", send_fill
        )
        drain = {ident: max(0, n - send_buf.get(ident, 0)) for ident, n in send_fill.items()}
        yield _counter(
            "hpfeeds_broker_connection_send_buffer_drain",
            "Number of bytes drained from the send buffer and sent",
            drain,
        )

        yield CounterMetricFamily("hpfeeds_broker_received_bytes", "Bytes received from clients", value=total_recv)
        yield CounterMetricFamily("hpfeeds_broker_sent_bytes", "Bytes queued to clients", value=total_sent)

        subs = GaugeMetricFamily(
            "hpfeeds_broker_subscriptions", "Number of subscriptions to a channel", labels=["ident", "chan"]
        )
        for labels, n in subscriptions.items():
            subs.add_metric(list(labels), n)
        yield subs

        count = CounterMetricFamily(
            "hpfeeds_broker_receive_publish_count",
            "Number of events received by broker for a channel",
            labels=["ident", "chan"],
        )
        size = HistogramMetricFamily(
            "hpfeeds_broker_receive_publish_size",
            "Sizes of messages received by broker for a channel",
            labels=["ident", "chan"],
        )
        for labels, st in publish.items():
            count.add_metric(list(labels), st.count)
            size.add_metric(list(labels), _histogram_buckets(st), float(st.bytes))
        yield count
        yield size

        deliveries = CounterMetricFamily(
            "hpfeeds_broker_deliveries", "Messages delivered to subscribers, per channel", labels=["chan"]
        )
        for chan, n in list(broker.router.deliveries.items()):
            deliveries.add_metric([_text(chan)], n)
        yield deliveries
        yield from _durable_metrics(broker)

        from .logs import dropped_lines

        yield CounterMetricFamily(
            "hpfeeds_broker_log_lines_dropped",
            "Log lines dropped because the log output did not keep up (logs.MAX_QUEUED_RECORDS)",
            value=dropped_lines(),
        )


# Per durable ident (docs/durable.md): (name, help, kind, field of Broker.durable_state).
_DURABLE_METRICS = (
    ("hpfeeds_durable_consuming", "A connection of this durable key consumes its backlog", "gauge", "consuming"),
    ("hpfeeds_durable_backlog_messages", "Messages kept for this durable key, not yet read", "gauge",
     "backlog_messages"),
    ("hpfeeds_durable_backlog_bytes", "Bytes of segments kept for this durable key", "gauge", "backlog_bytes"),
    ("hpfeeds_durable_oldest_unread_age_seconds", "Age of the oldest message kept for this durable key", "gauge",
     "oldest_unread_age_s"),
    ("hpfeeds_durable_replayed", "Messages sent to this durable key from the log", "counter", "replayed"),
    ("hpfeeds_durable_dropped", "Messages dropped for this durable key by --durable-max-bytes/--durable-max-age",
     "counter", "dropped"),
    ("hpfeeds_durable_overlap_duplicates", "Messages sent again to this durable key after an abortive close",
     "counter", "overlap_duplicates"),
)  # fmt: skip


def _durable_metrics(broker: Broker) -> Iterator[Any]:
    durable = broker.durable
    if durable is None:
        return
    states = {}
    for ident in sorted(set(durable.idents()) | set(list(broker.feed_stats))):
        state = broker.durable_state(ident)
        if state is not None:
            states[ident] = state
    for name, doc, kind, field in _DURABLE_METRICS:
        values = {ident: state[field] for ident, state in states.items()}
        yield _gauge(name, doc, values) if kind == "gauge" else _counter(name, doc, values)
    stats = durable.stats()
    yield GaugeMetricFamily("hpfeeds_durable_degraded", "The durable log's last write failed", value=stats.degraded)
    yield CounterMetricFamily(
        "hpfeeds_durable_unstored", "Messages the durable log could not store (disk full, I/O error)",
        value=stats.unstored,
    )  # fmt: skip
    yield GaugeMetricFamily("hpfeeds_durable_disk_bytes", "Bytes in durable segment files", value=stats.disk_bytes)


def _text(channel: bytes) -> str:
    return channel.decode("utf-8", "backslashreplace")


def _gauge(name: str, doc: str, values: dict[str, int] | dict[str, float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["ident"])
    for ident, v in values.items():
        g.add_metric([ident], v)
    return g


def _counter(name: str, doc: str, values: dict[str, int]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["ident"])
    for ident, v in values.items():
        c.add_metric([ident], v)
    return c


def register_broker(broker: Broker, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Attach the broker's live-state collector; returns a function that detaches it."""
    collector = BrokerCollector(broker)
    registry.register(collector)
    return lambda: registry.unregister(collector)
