"""docs/operations.md "TLS", run: its openssl command makes a certificate that
clients accept by host name and by IP address, its broker command serves it,
and its client commands connect (the documented IP replaced by 127.0.0.1)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from .support import BROKER, REPO, free_port, running_broker

DOC = REPO / "docs" / "operations.md"
DOC_IP = "192.0.2.10"
DOC_NAME = "hpfeeds.example.org"
HPFEEDS = Path(sys.executable).parent / "hpfeeds"


def tls_commands() -> list[str]:
    """The TLS section's bash commands, continuation lines joined, comments dropped."""
    text = DOC.read_text()
    start = text.index("## TLS")
    section = text[start : text.index("\n## ", start + 1)]
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```$", section, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("  #", 1)[0].split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_every_documented_certificate_names_the_host_and_the_ip() -> None:
    openssl = [c for c in tls_commands() if c.startswith("openssl req")]
    # The plain one, the compose one (the same), and the ECDSA one of "TLS performance".
    assert len(openssl) == 3, openssl
    assert openssl[0] == openssl[1], "the plain and compose certificates are made the same way"
    assert "ec_paramgen_curve:P-256" in openssl[2]
    for command in openssl:
        assert f"subjectAltName=DNS:{DOC_NAME},IP:{DOC_IP}" in command, command
    compose_comment = (REPO / "deploy/compose/tls.yml").read_text()
    assert f"subjectAltName=DNS:{DOC_NAME},IP:{DOC_IP}" in compose_comment


def test_documented_tls_setup_works_by_ip_and_by_name(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    commands = tls_commands()
    openssl = next(c for c in commands if c.startswith("openssl req"))
    made = subprocess.run(
        shlex.split(openssl.replace(DOC_IP, "127.0.0.1")), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr

    start = next(c for c in commands if c.startswith("hpfeeds-broker --bind=0.0.0.0:10000 --tlskey"))
    port = free_port()
    argv = shlex.split(start.replace("0.0.0.0:10000", f"127.0.0.1:{port}"))
    argv[0] = str(BROKER)
    (tmp_path / "keys.json").write_text('{"sensor1": {"secret": "s", "pubchans": ["cowrie.sessions"], "subchans": []}}')
    argv += ["--auth", "keys.json"]
    # The README's secret file (a sensor's shell has only what it reads itself).
    prefix = "HPFEEDS_SECRET=$(cat sensor1.secret) hpfeeds publish "
    clients = [c.removeprefix(prefix) for c in commands if c.startswith(prefix)]
    assert [c.split()[1] for c in clients] == [DOC_IP, DOC_NAME], clients

    with running_broker(argv, tmp_path) as broker:

        def publish(command: str, *extra: str) -> subprocess.CompletedProcess[str]:
            args = [a if a not in (DOC_IP, DOC_NAME) else "127.0.0.1" for a in shlex.split(command)]
            return subprocess.run(
                [str(HPFEEDS), "publish", *args, "-p", str(port), "--wait", "0.1", *extra],
                cwd=tmp_path,
                env={**os.environ, "HPFEEDS_SECRET": "s"},
                capture_output=True,
                text=True,
                timeout=60,
            )

        context = ssl.create_default_context(cafile=str(tmp_path / "broker.crt"))
        context.check_hostname = False  # the probe connects as "localhost"; the clients below check names
        broker.wait_ready(port, ssl_context=context)
        by_ip = publish(clients[0])
        assert by_ip.returncode == 0, by_ip.stderr
        # The name in the certificate, while the connection goes to 127.0.0.1.
        by_name = publish(clients[1], "--tls-server-name", DOC_NAME)
        assert by_name.returncode == 0, by_name.stderr
        wrong = publish(clients[1], "--tls-server-name", "other.example.org")
        assert wrong.returncode == 3 and "TLS" in wrong.stderr, wrong.stderr
        plain = subprocess.run(
            [str(HPFEEDS), "publish", "-p", str(port), "-i", "sensor1", "-s", "s", "-c", "x", "--timeout", "2", "x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.returncode == 3 and plain.stderr.strip().endswith("is this a TLS port? try --tls"), plain.stderr
        assert broker.stop() == 0
