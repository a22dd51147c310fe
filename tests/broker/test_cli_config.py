"""Flags → BrokerConfig, without starting anything."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpfeeds3.broker.auth.spec import ACCEPTED, BACKENDS, parse_spec
from hpfeeds3.broker.cli import AUTH_LIMIT_FLAGS, LIMIT_FLAGS, build_parser, config_from_args
from hpfeeds3.broker.config import ConfigError, Endpoint, Limits, limit_fields, parse_endpoint, parse_host_port
from hpfeeds3.broker.supervisor import HOST_WIDE_LIMITS


def config(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_every_limit_field_has_a_flag() -> None:
    assert {field for _, field, _ in LIMIT_FLAGS} == set(Limits.__dataclass_fields__)


def test_the_workers_division_follows_the_limits_declared_host_wide() -> None:
    declared = {(f.metadata["flag"], f.name) for f in limit_fields() if f.metadata["host_wide"]}
    divided = {(flag, name) for flag, group, name in HOST_WIDE_LIMITS if group == "limits"}
    assert divided == declared


def test_the_security_limits_table_names_every_limit_flag() -> None:
    text = (Path(__file__).parents[2] / "SECURITY.md").read_text()
    table = text[text.index("| threat | limit (default) | flag |") :].split("\n\n")[0]
    flags = set(re.findall(r"`(--[a-z-]+)`", table))
    assert {f.metadata["flag"] for f in limit_fields()} <= flags
    assert {flag for flag, _, _ in AUTH_LIMIT_FLAGS} <= flags


def test_help_shows_each_limit_with_its_default() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "cut a subscriber at once above this many queued bytes (default 32M)" in text
    assert "accept -> AUTH verified (default 5 s)" in text
    assert "channels per connection (default 1024)" in text


def test_limit_flags_reach_the_config() -> None:
    c = config(
        *("--max-message-size", "2M", "--auth-timeout", "1.5", "--max-connections", "7"),
        *("--send-buffer-hard", "64K", "--shutdown-drain", "0", "--revocation-poll", "0.2"),
        *("--auth-fail-limit", "0", "--auth-fail-block", "10"),
    )
    assert c.limits.max_message_bytes == 2 * 1024 * 1024
    assert c.limits.auth_timeout_s == 1.5
    assert c.limits.max_connections == 7
    assert c.limits.send_buffer_hard_bytes == 64 * 1024
    assert c.limits.shutdown_drain_s == 0
    assert c.limits.revocation_poll_s == 0.2
    assert c.auth_limits.per_ident == 0 and c.auth_limits.block_s == 10
    assert {f for _, f, _ in AUTH_LIMIT_FLAGS} == {"per_ident", "per_address", "window_s", "block_s"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--auth-fail-limit", "-1"],
        ["--auth-timeout", "0"],
        ["--max-connections", "0"],
        ["--max-message-size", "lots"],
        ["--shutdown-drain", "-1"],
    ],
)
def test_bad_limit_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_defaults_are_the_spec() -> None:
    c = config()
    assert c.endpoints == (Endpoint("tcp", "0.0.0.0", 10000),)
    assert c.auth == ("sqlite",)
    assert c.name == "hpfeeds"


def test_bind_with_tls_and_extra_endpoints(tmp_path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    c = config("--bind", "[::]:10001", "--tlscert", str(cert), "--tlskey", str(key), "-e", "tcp:port=10002")
    assert c.endpoints == (
        Endpoint("tls", "::", 10001, cert=str(cert), key=str(key)),
        Endpoint("tcp", "::", 10002),  # no interface=: the --bind host
    )
    with pytest.raises(ConfigError, match="cannot read TLS file"):
        config("--tlscert", str(tmp_path / "missing.pem"), "--tlskey", str(key))


def test_workers_need_a_cluster() -> None:
    with pytest.raises(ConfigError, match="--workers needs --cluster"):
        config("--workers", "2")
    assert config("--workers", "2", "--cluster", "nats://a:4222,nats://b:4222").cluster == (
        "nats://a:4222",
        "nats://b:4222",
    )


def test_endpoint_strings_as_the_reference_writes_them() -> None:
    assert parse_endpoint("tls:interface=127.0.0.1:port=443:device=eth0:privateKey=k:cert=c") == Endpoint(
        "tls", "127.0.0.1", 443, device="eth0", cert="c", key="k"
    )
    with pytest.raises(ConfigError):
        parse_endpoint("tls:port=1")
    with pytest.raises(ConfigError):
        parse_endpoint("udp:port=1")
    assert parse_host_port(":9431") == ("0.0.0.0", 9431)
    with pytest.raises(ConfigError):
        parse_host_port("nonsense")


def test_auth_help_and_errors_list_every_backend_of_the_table() -> None:
    text = build_parser().epilog or ""
    for b in BACKENDS:
        for form, what in b.forms:
            assert form in text and what in text
            assert form in ACCEPTED
    with pytest.raises(ConfigError, match=re.escape("expected sqlite, sqlite:PATH, env, PATH.json or postgresql://")):
        parse_spec("mysql://x")
