"""deploy/systemd/hpfeeds-broker.service: hardened, valid for systemd, and its
ExecStart line (taken from the file) serves and logs JSON when run here."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from .support import BROKER, REPO
from .test_docker_files import Run, execute

UNIT = REPO / "deploy" / "systemd" / "hpfeeds-broker.service"
UNIT_BROKER = "/opt/hpfeeds3/bin/hpfeeds-broker"


def directives() -> dict[str, list[str]]:
    """Active (uncommented) directives of the [Service] section, in order."""
    found: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed on this machine (apt-get install systemd; .ci/run does)")
    return tool


def test_unit_is_hardened() -> None:
    d = directives()
    for key, value in {
        "DynamicUser": "yes",
        "StateDirectory": "hpfeeds",
        "WorkingDirectory": "/var/lib/hpfeeds",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "KillSignal": "SIGTERM",
    }.items():
        assert d.get(key) == [value], f"{key}={d.get(key)}"
    assert int(d["LimitNOFILE"][0]) > 10_000, "room for the default 10,000 connections"
    assert d["CapabilityBoundingSet"] == [""], "no capabilities: port 10000 needs none"
    # The broker drains for up to 10 s on SIGTERM; systemd must wait longer before SIGKILL.
    assert int(d["TimeoutStopSec"][0]) > 10


def test_unit_passes_systemd_verify_and_security_review(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = tmp_path / UNIT.name
    # verify checks that ExecStart's program exists: point it at this environment's broker.
    unit.write_text(UNIT.read_text().replace(UNIT_BROKER, str(BROKER)))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Exposure at most 2.0 on systemd's 0 (locked down) .. 10 (unprotected) scale.
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--threshold=20", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_command_serves_and_logs_json(tmp_path: Path) -> None:
    (exec_start,) = directives()["ExecStart"]
    command = shlex.split(exec_start)
    # The Docker HEALTHCHECK is irrelevant under systemd: healthcheck_disabled.
    log = execute(Run(command=command, published={10000}, healthcheck_disabled=True), tmp_path, exe=UNIT_BROKER)
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    events = {r.get("event") for r in records}
    assert {"authenticated", "closed"} <= events, events
    authenticated = next(r for r in records if r.get("event") == "authenticated")
    assert authenticated["ident"] == "ident" and authenticated["peer"].startswith("127.0.0.1:")
    assert not any("secret" in json.dumps(r) for r in records), "a secret reached the log"


def test_tls_variant_says_a_renewal_needs_a_restart() -> None:
    # LoadCredential= hands the broker a copy made at start: its reload-on-change
    # watches that copy, which a renewal never touches. Unit and docs must say so.
    text = UNIT.read_text()
    tls = [line for line in text.splitlines() if "LoadCredential" in line or "TLS" in line or "restart" in line]
    assert any(line.startswith("#LoadCredential=") for line in tls), tls
    assert "try-restart hpfeeds-broker" in text
    docs = (REPO / "docs" / "operations.md").read_text()
    assert "systemctl try-restart hpfeeds-broker" in docs
    readme = (REPO / "README.md").read_text()
    assert "reloaded when the files change" not in readme or "LoadCredential" in readme
