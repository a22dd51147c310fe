"""The --cluster-* flags: one sign-in, secrets from readable files, nothing without --cluster."""

from __future__ import annotations

import pytest

from hpfeeds3.broker.cli import build_parser, config_from_args
from hpfeeds3.broker.config import ConfigError


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_password_and_tls_files_reach_the_config(tmp_path) -> None:
    for name in ("pw", "ca.pem", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    config = parse(
        *("--cluster", "nats://n:4222", "--cluster-user", "b1", "--cluster-password-file", str(tmp_path / "pw")),
        *("--cluster-tls-ca", str(tmp_path / "ca.pem")),
        *("--cluster-tls-cert", str(tmp_path / "c.crt"), "--cluster-tls-key", str(tmp_path / "c.key")),
        *("--cluster-outbox", "8M"),
    )
    assert config.cluster_auth.user == "b1"
    assert config.cluster_auth.wants_tls()
    assert config.limits.cluster_outbox_bytes == 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster-user", "b1"], "need --cluster"),
        (["--cluster", "nats://n", "--cluster-user", "b1"], "must be given together"),
        (["--cluster", "nats://n", "--cluster-tls-cert", "PW"], "must be given together"),
        (["--cluster", "nats://n", "--cluster-token-file", "PW", "--cluster-nkey", "PW"], "one NATS sign-in"),
        (["--cluster", "nats://n", "--cluster-token-file", "/nonexistent/token"], "cannot read --cluster-token-file"),
        (["--cluster-key-file", "PW"], "need --cluster"),
        (["--cluster", "nats://n", "--cluster-key-file", "/nonexistent/key"], "cannot read --cluster-key-file"),
    ],
)
def test_wrong_cluster_flags_are_refused_with_one_line(tmp_path, argv, message) -> None:
    (tmp_path / "pw").write_text("x")
    argv = [a.replace("PW", str(tmp_path / "pw")) for a in argv]
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_a_short_cluster_key_is_refused(tmp_path) -> None:
    from hpfeeds3.broker.backplane.nats import load_cluster_key

    (tmp_path / "key").write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        load_cluster_key(str(tmp_path / "key"))
    (tmp_path / "key").write_text("0123456789abcdef0123456789abcdef\n")
    assert load_cluster_key(str(tmp_path / "key")) == load_cluster_key(str(tmp_path / "key"))
