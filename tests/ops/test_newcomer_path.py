"""A newcomer's path, command by command, as README.md and docs/ write it:
install from the checkout into a FRESH virtual environment, start the broker,
add keys, subscribe, publish (three ways); then docs/client.md's examples and
docs/console.md's start against the same broker and keys.

Each documented block runs in a shell of its own, in the checkout, with a
bare environment (PATH of the system only, nothing from this test run): a
shell has only what the block itself sets, as a new terminal would. A block
that runs for ever (a broker, a subscriber) is started in the background.

SLOW: the fresh venv costs about a minute (pip, with its cache). It is made
once per test session, from a copy of this checkout (the files git knows,
as they are in the working tree), so the install line runs exactly as written.

The commands are taken from the docs, not retyped; the only rewrites are
listed in ``localise``: free loopback ports for 10000 and 8080, ``-n N -v``
so a subscriber ends and says when it is subscribed, ``cat`` for ``tail -f``,
``python -u`` for a script whose output is read while it runs, and the
console token the doc calls ``hpfc_...``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .support import REPO, copy_checkout, free_port, running_broker

README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"
CLIENT = REPO / "docs" / "client.md"
CONSOLE = REPO / "docs" / "console.md"
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


def localise(line: str, port: int, admin_port: int = 0) -> str:
    """The doc's command, run here: free loopback ports instead of 10000 (and 8080)."""
    line = line.replace("0.0.0.0:10000", f"127.0.0.1:{port}").replace("tail -f ", "cat ")
    line = re.sub(r"(-p |, |HPFEEDS_PORT=)10000\b", rf"\g<1>{port}", line)
    return line.replace("127.0.0.1:8080", f"127.0.0.1:{admin_port}") if admin_port else line


BARE_PATH = "/usr/local/bin:/usr/bin:/bin"


def bare_env() -> dict[str, str]:
    """What a new terminal has: the system's PATH, HOME, a locale; no venv, no HPFEEDS_*."""
    keep = ("HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER")
    return {"PATH": BARE_PATH, **{k: os.environ[k] for k in keep if k in os.environ}}


def shell(block: str, cwd: Path, *, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """One documented block in a new shell of its own; any failing command fails it."""
    result = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + block],
        cwd=cwd,
        env=bare_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{block}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


class Background:
    """A block that runs until stopped (a subscriber, a script), in a shell of its own."""

    def __init__(self, block: str, cwd: Path, name: str) -> None:
        self.out, self.err = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                ["bash", "-c", "set -eo pipefail\n" + block],
                cwd=cwd,
                env=bare_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.block = block

    def wait_for(self, needle: str, where: str = "err", timeout: float = STEP_TIMEOUT_S) -> str:
        path = self.err if where == "err" else self.out
        deadline = time.monotonic() + timeout
        while needle not in (text := path.read_text(errors="replace")):
            assert time.monotonic() < deadline and self.proc.poll() is None, (
                f"{self.block}\nno {needle!r} on std{where} (exit {self.proc.poll()}):\n"
                f"{self.out.read_text(errors='replace')}\n{self.err.read_text(errors='replace')}"
            )
            time.sleep(0.05)
        return text

    def finish(self, timeout: float = STEP_TIMEOUT_S) -> str:
        """Its stdout once it ended by itself, exit 0."""
        code = self.proc.wait(timeout)
        assert code == 0, f"{self.block}\nexit {code}\n{self.err.read_text(errors='replace')}"
        return self.out.read_text(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def bash_blocks(path: Path, after: str) -> list[str]:
    """The section's bash and sh blocks, whole, comment lines dropped."""
    found = []
    for language in ("bash", "sh"):
        for block in blocks(path, language, after):
            lines = (ln.split("  #", 1)[0].rstrip() for ln in block.splitlines())
            found.append("\n".join(ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")))
    return found


def subscriber(line: str, count: int) -> str:
    """A documented subscribe line that ends after ``count`` messages and says when it is subscribed."""
    return re.sub(r"(hpfeeds subscribe [^|]*?)(\s*\||$)", rf"\1 -n {count} -v\2", line, count=1)


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


def test_readme_then_client_and_console_docs_in_order(fresh_venv: Path, checkout: Path) -> None:
    port, admin_port = free_port(), free_port()
    here = checkout
    for name in ("sqlite.db", "sensor1.secret", "collector.secret", "console-tokens.txt"):
        (here / name).unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        jobs: list[Background] = []

        @stack.callback
        def stop_jobs() -> None:
            for job in jobs:
                job.stop()

        def background(block: str, name: str) -> Background:
            jobs.append(Background(block, here, name))
            return jobs[-1]

        # --- README, shell 1: the broker ------------------------------------------------
        running = blocks(README, "bash", "## Running the broker")
        assert running[0].startswith("# shell 1") and running[1].startswith("# shell 2"), running
        start, keys = (localise(b, port) for b in bash_blocks(README, "## Running the broker")[:2])
        assert start.splitlines() == [". .venv/bin/activate", f"hpfeeds-broker --bind 127.0.0.1:{port} --name mybroker"]
        # exec: the broker is the shell's own process, so SIGTERM (the test's Ctrl-C) reaches it.
        b = stack.enter_context(
            running_broker(["bash", "-c", start.replace("\nhpfeeds", "\nexec hpfeeds")], here, bare_env())
        )
        b.wait_ready(port)
        assert "hpfeeds3 " in b.wait_log("broker 'mybroker' serving")

        # --- shell 2: two keys, their secrets into files ---------------------------------
        listed = shell(keys, here).stdout
        assert "sensor1" in listed and "collector" in listed, listed
        for ident in ("sensor1", "collector"):
            assert len((here / f"{ident}.secret").read_text().strip()) >= 32, ident
            assert (here / f"{ident}.secret").stat().st_mode & 0o077 == 0, "umask 077: only you read it"

        # --- shell 3: the collector; shell 2: the sensor publishes; the Python example ----
        collector_block, sensor_block = (
            localise(b, port) for b in bash_blocks(README, "## Publishing and subscribing")
        )
        assert blocks(README, "bash", "## Publishing and subscribing")[0].startswith("# shell 3")
        sub = background(subscriber(collector_block, 3), "readme-collector")
        sub.wait_for("subscribed to")
        (here / "events.log").write_text('{"src_ip": "192.0.2.2"}\n')
        shell(sensor_block, here)
        (python_block,) = blocks(README, "python", "## Publishing and subscribing")
        (here / "example.py").write_text(localise(python_block, port))
        assert "`. .venv/bin/activate && python example.py`" in README.read_text()
        shell(". .venv/bin/activate && python example.py", here)
        received = sub.finish()
        assert received.count("src_ip") == 3 and received.count('"sensor1"') == 3, received
        for ip in ("192.0.2.1", "192.0.2.2"):
            assert ip in received, received

        # --- README, Performance: a bench broker of its own beside the running one -------
        bench_port = free_port()
        activate, start_bench, run_bench = bash_blocks(README, "## Performance")[0].splitlines()
        assert start_bench.endswith(" &") and "--bind 127.0.0.1:10001 " in start_bench, start_bench
        bench_broker = background(f"{activate}\n{start_bench[:-2].replace('10001', str(bench_port))}", "bench-broker")
        bench_broker.wait_for(f"listening on tcp://127.0.0.1:{bench_port}", timeout=30)
        # --smoke: each scenario for a fraction of a second (correctness, not figures).
        shell(f"{activate}\n{run_bench.replace('10001', str(bench_port))} --smoke", here, timeout=300)
        bench_broker.stop()

        # --- docs/client.md: the asyncio subscriber, then the command's collector and sensor ---
        asyncio_block = blocks(CLIENT, "python", "## asyncio")[0]
        (here / "client_example.py").write_text(localise(asyncio_block, port))
        script = background(". .venv/bin/activate && python -u client_example.py", "client-asyncio")
        # It prints nothing until a message comes: the README's sensor publishes until it has one.
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while "cowrie.sessions" not in script.out.read_text():
            assert time.monotonic() < deadline and script.proc.poll() is None, script.err.read_text()
            shell(sensor_block, here)
        collector, sensor = (localise(b, port) for b in bash_blocks(CLIENT, "## The `hpfeeds` command")[:2])
        setup = [ln for ln in collector.splitlines() if "hpfeeds subscribe" not in ln]
        subscribes = [ln for ln in collector.splitlines() if "hpfeeds subscribe" in ln]
        assert len(subscribes) == 2, collector
        subs = [background("\n".join([*setup, subscriber(ln, 3)]), f"client-sub{i}") for i, ln in enumerate(subscribes)]
        for s in subs:
            s.wait_for("subscribed to")
        (here / "event.json").write_text('{"src_ip": "192.0.2.3"}')
        shell(sensor, here)
        plain, as_json = (s.finish() for s in subs)
        assert "cowrie.sessions sensor1 hello world" in plain and "192.0.2.3" in plain, plain
        assert '"hello world"' in as_json and "192.0.2.3" in as_json, as_json
        script.wait_for("b'hello world'", where="out")
        script.stop()

        # --- docs/console.md: the same broker and store again, with the console -----------
        assert b.stop() == 0, b.log()
        assert b.log().rstrip().endswith("broker stopped"), b.log()
        assert "Traceback" not in b.log(), b.log()
        lines = localise(bash_blocks(CONSOLE, "# Operator console")[0], port, admin_port).splitlines()
        assert lines[0] == ". .venv/bin/activate" and "admin.tokens" in lines[1], lines
        token = shell("\n".join(lines[:2]), here).stderr.split("token (shown once): ", 1)[1].split()[0]
        console = stack.enter_context(running_broker(["bash", "-c", f"{lines[0]}\nexec {lines[2]}"], here, bare_env()))
        console.wait_ready(port)
        console.wait_log(f"console on http://127.0.0.1:{admin_port}/")
        for block in bash_blocks(CONSOLE, "## API"):
            block = localise(block, port, admin_port).replace("hpfc_...", token)
            assert block.startswith(f"T={token}\n"), block
            out = shell(block, here).stdout
            assert '"sensor1"' in out or ('"secret"' in out and '"removed"' in out), out
        assert console.stop() == 0
        assert "Traceback" not in console.log(), console.log()


def test_wheel_recipe_builds_and_installs_with_the_system_python(
    fresh_venv: Path, checkout: Path, tmp_path: Path
) -> None:
    # docs/operations.md "Installing", run in a bare shell: python3 is the
    # system's (on Debian and Ubuntu an externally managed Python, whose pip
    # refuses to install outside a virtual environment).
    lines = command_lines(OPERATIONS, "## Installing")
    (build,) = [line for line in lines if "-m build" in line]
    (install,) = [line for line in lines if ".whl" in line]
    shell(build, checkout, timeout=INSTALL_TIMEOUT_S)
    (wheel,) = (checkout / "dist").glob("hpfeeds3-*.whl")
    assert wheel.name in install, (wheel.name, install)
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy2(wheel, target / wheel.name)
    shell(install, target, timeout=INSTALL_TIMEOUT_S)
    version = subprocess.run(
        [str(target / ".venv/bin/hpfeeds-broker"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("hpfeeds-broker "), version
