"""A newcomer's path, command by command, as README.md and docs/operations.md
write it: install from the checkout into a FRESH virtual environment, start the
broker, add keys, subscribe, publish (three ways), stop.

SLOW: the fresh venv costs about a minute (pip, with its cache). It is made
once per test session, from a copy of this checkout (the files git knows,
as they are in the working tree), so the install line runs exactly as written.

The commands are taken from the docs, not retyped; the only rewrites are
listed in ``localise``: a free loopback port for 10000, ``-n 3 -v`` so the
subscriber ends, ``cat`` for ``tail -f``, and the venv's ``bin`` on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .support import REPO, copy_checkout, free_port, running_broker

README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"
INSTALL_TIMEOUT_S = 420.0
STEP_TIMEOUT_S = 60.0

pytestmark = [pytest.mark.fresh_venv, pytest.mark.timeout(INSTALL_TIMEOUT_S + 180)]


def blocks(path: Path, language: str, after: str) -> list[str]:
    """The ``language`` code blocks of ``path`` that follow the heading ``after``, up to the next heading."""
    text = path.read_text()
    start = text.index(after)
    end = text.find("\n## ", start + len(after))
    section = text[start : end if end != -1 else len(text)]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, re.M | re.S)


def command_lines(path: Path, after: str) -> list[str]:
    """Every command of the section's bash blocks, comments and blank lines dropped."""
    lines = []
    for block in blocks(path, "bash", after):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].rstrip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def the_one(lines: list[str], pattern: str) -> str:
    found = [line for line in lines if re.search(pattern, line)]
    assert len(found) == 1, f"expected one command matching {pattern!r}, found {found}"
    return found[0]


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this checkout's files (tracked and new, as they are now), without any venv."""
    return copy_checkout(tmp_path_factory.mktemp("newcomer") / "hpfeeds3")


@pytest.fixture(scope="session")
def fresh_venv(checkout: Path) -> Path:
    """README's Quick start, step 1, up to the broker start: ``python3 -m venv .venv && pip install '.[broker]'``."""
    (quick_start,) = [line for line in command_lines(README, "## Quick start") if "'.[broker]'" in line]
    steps = quick_start.split(" && ")
    assert steps[:2] == ["python3 -m venv .venv", ".venv/bin/pip install '.[broker]'"], steps
    assert steps[2:] == [".venv/bin/hpfeeds-broker"], steps  # started below, in the background
    # The same two steps as docs/operations.md "Installing" writes them.
    install = command_lines(OPERATIONS, "## Installing")
    assert "python3 -m venv .venv && .venv/bin/pip install '.[broker]'" in install, install
    python3 = shutil.which("python3") or sys.executable
    started = time.monotonic()
    for step in steps[:2]:
        argv = step.split()
        argv = [python3, *argv[1:]] if argv[0] == "python3" else [str(checkout / argv[0]), *argv[1:]]
        argv = [a.strip("'") for a in argv]
        result = subprocess.run(argv, cwd=checkout, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert result.returncode == 0, f"{step}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    print(f"\nfresh venv installed from the checkout in {time.monotonic() - started:.0f} s")
    return checkout / ".venv"


def env_for(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPFEEDS_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def localise(line: str, port: int) -> str:
    """The doc's command, run here: a free loopback port instead of 10000."""
    line = line.replace("0.0.0.0:10000", f"127.0.0.1:{port}")
    return re.sub(r"(-p |, )10000\b", rf"\g<1>{port}", line)


def test_installed_package_is_this_checkout_with_its_docs(fresh_venv: Path, checkout: Path) -> None:
    import tomllib

    version = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["version"]
    for command in ("hpfeeds-broker", "hpfeeds", "hpfeeds-bench"):
        result = subprocess.run(
            [str(fresh_venv / "bin" / command), "--version"], capture_output=True, text=True, timeout=STEP_TIMEOUT_S
        )
        assert (result.returncode, result.stdout.strip()) == (0, f"{command} {version}"), result.stderr
    # What `hpfeeds-broker --version` prints in docs/operations.md.
    assert f".venv/bin/hpfeeds-broker --version                               # hpfeeds-broker {version}" in (
        OPERATIONS.read_text()
    )
    # The systemd unit's Documentation= names a file the install put there.
    unit = (checkout / "deploy/systemd/hpfeeds-broker.service").read_text()
    (doc,) = re.findall(r"^Documentation=file:/opt/hpfeeds3/(\S+)$", unit, re.M)
    assert (fresh_venv / doc).is_file(), doc


def test_readme_commands_in_order(fresh_venv: Path, tmp_path: Path) -> None:
    port = free_port()
    running = command_lines(README, "## Running the broker")
    start = the_one(running, r"^hpfeeds-broker --bind ")
    keys = [line for line in running if " keys " in line]
    assert len(keys) == 3 and keys[-1] == "hpfeeds-broker keys list", keys
    shell = command_lines(README, "## Publishing and subscribing")
    subscribe = the_one(shell, r"^hpfeeds subscribe ")
    publish = the_one(shell, r"^hpfeeds publish ")
    lines = the_one(shell, r"^tail -f events\.log \| hpfeeds publish --lines ")
    (python_block,) = blocks(README, "python", "## Publishing and subscribing")

    env = env_for(fresh_venv)
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker_argv = localise(start, port).split()
    broker_argv[0] = str(fresh_venv / "bin" / broker_argv[0])
    with running_broker(broker_argv, workdir, env) as broker:
        broker.wait_ready(port)
        assert "hpfeeds3 " in broker.wait_log("broker 'mybroker' serving")

        # keys add prints the secret; the doc exports it for what follows. One
        # shell runs the rest, in the doc's order, so the variables carry over.
        (workdir / "events.log").write_text('{"src_ip": "192.0.2.2"}\n')
        (workdir / "readme_example.py").write_text(localise(python_block, port))
        if shutil.which("jq"):
            sub = localise(subscribe, port).replace(" --json", " --json -n 3 -v")
        else:
            sub = localise(subscribe, port).replace(" --json | jq .", " --json -n 3 -v")
        script = textwrap.dedent(
            f"""\
            set -eu
            # A failed step must not leave the background subscriber running.
            trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
            {keys[0]}
            {keys[1]}
            test -n "$SENSOR_SECRET" && test -n "$COLLECTOR_SECRET"
            {keys[2]} > keys-list.txt
            ( {sub} ) > received.txt 2> subscriber.err &
            for _ in $(seq 1 300); do grep -q "subscribed to" subscriber.err && break; sleep 0.1; done
            grep -q "subscribed to" subscriber.err
            {localise(publish, port)}
            {localise(lines, port).replace("tail -f events.log", "cat events.log")}
            python readme_example.py
            wait
            """
        )
        result = subprocess.run(
            ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
        )
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}\n{broker.log()}"
        assert broker.stop() == 0
        log = broker.log()

    listed = (workdir / "keys-list.txt").read_text()
    assert "sensor1" in listed and "collector" in listed, listed
    received = (workdir / "received.txt").read_text()
    assert received.count("src_ip") == 3 and received.count('"sensor1"') == 3, received
    for ip in ("192.0.2.1", "192.0.2.2"):
        assert ip in received, received
    assert log.rstrip().endswith("broker stopped"), log
    assert "Traceback" not in log and "Traceback" not in result.stderr
