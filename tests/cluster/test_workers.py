"""``--workers N``: host-wide limits are divided over the workers, per-connection limits are not."""

from __future__ import annotations

from hpfeeds3.broker.cli import build_parser, config_from_args
from hpfeeds3.broker.supervisor import worker_argv, worker_limits

ARGV = [
    *("--bind", "127.0.0.1:10000", "--cluster", "nats://127.0.0.1:4222", "--workers", "3"),
    *("--max-connections", "1000", "--max-unauthenticated", "100", "--auth-fail-limit", "0"),
    *("--send-buffer-hard", "4M", "--max-subscriptions", "50", "--exporter", "127.0.0.1:9431"),
]


def worker_config(index: int):
    parent = config_from_args(build_parser().parse_args(ARGV))
    argv = worker_argv(ARGV, index, "127.0.0.1:9431", worker_limits(parent, 3))
    assert "--workers" not in argv
    return parent, config_from_args(build_parser().parse_args(argv))


def test_host_wide_limits_are_shared_out_rounded_up_and_zero_stays_disabled() -> None:
    parent, worker = worker_config(2)
    assert worker.limits.max_connections == 334
    assert worker.limits.max_unauthenticated == 34
    assert worker.limits.cluster_outbox_bytes == -(-parent.limits.cluster_outbox_bytes // 3)
    assert worker.auth_limits.per_ident == 0
    assert worker.auth_limits.per_address == -(-parent.auth_limits.per_address // 3)
    assert worker.exporter == ("127.0.0.1", 9433)
    assert worker.reuse_port


def test_per_connection_limits_are_unchanged() -> None:
    parent, worker = worker_config(0)
    assert worker.limits.send_buffer_hard_bytes == parent.limits.send_buffer_hard_bytes == 4 * 1024 * 1024
    assert worker.limits.max_subscriptions == 50
    assert worker.limits.max_message_bytes == parent.limits.max_message_bytes
    assert worker.auth_limits.window_s == parent.auth_limits.window_s
