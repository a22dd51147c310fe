"""What a new operator installs and sees first: the right package, a start-up
line naming it, exit codes as ``--help`` states them, listeners where asked."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import trustme

from hpfeeds3 import __version__

from .support import BROKER, REPO, free_port, running_broker

# The highest release of the name ``hpfeeds3`` on the package index (another
# project's), checked with ``pip index versions hpfeeds3`` on 2026-12-01.
HIGHEST_INDEX_RELEASE = (0, 9, 10)

# Every file that tells someone how to install: docs, the unit, the image.
INSTALL_TEXTS = sorted(
    [
        REPO / "README.md",
        REPO / "SECURITY.md",
        REPO / "Dockerfile",
        *(REPO / "docs").glob("*.md"),
        *(REPO / "deploy").rglob("*.service"),
        *(REPO / "deploy").rglob("*.yml"),
    ]
)
# `pip install hpfeeds3`, `'hpfeeds3[broker]'`, `"hpfeeds3>=1"`, after any options.
BARE_INSTALL = re.compile(r"pip3?\s+install\s+(?:-\S+\s+)*['\"]?hpfeeds3(?![\w.-]*\.whl)\b")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_our_version_is_above_every_release_of_the_name_on_the_index() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert _version_tuple(declared) > HIGHEST_INDEX_RELEASE
    assert __version__ == declared, "the installed package is this checkout"


def test_the_bare_install_pattern_catches_what_it_must() -> None:
    for line in ("pip install 'hpfeeds3[broker]'", "/opt/x/bin/pip install -U hpfeeds3", 'pip install "hpfeeds3>=1"'):
        assert BARE_INSTALL.search(line), line
    for line in ("pip install '.[broker]'", "pip install 'dist/hpfeeds3-1.0.0-py3-none-any.whl[broker]'"):
        assert not BARE_INSTALL.search(line), line


@pytest.mark.parametrize("path", INSTALL_TEXTS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_install_line_names_the_bare_package(path: Path) -> None:
    found = [line.strip() for line in path.read_text().splitlines() if BARE_INSTALL.search(line)]
    assert not found, f"{path.name} installs by the bare name (another project's package): {found}"


def test_unit_documentation_is_a_doc_the_package_installs() -> None:
    unit = (REPO / "deploy/systemd/hpfeeds-broker.service").read_text()
    (url,) = re.findall(r"^Documentation=(\S+)$", unit, re.M)
    prefix = "file:/opt/hpfeeds3/share/doc/hpfeeds3/"
    assert url.startswith(prefix), url
    name = url[len(prefix) :]
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed = {Path(p).name for pattern in data_files["share/doc/hpfeeds3"] for p in REPO.glob(pattern)}
    assert name in installed, (name, installed)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BROKER), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_start_up_line_names_the_project_and_version(tmp_path: Path) -> None:
    port = free_port()
    with running_broker([str(BROKER), "--bind", f"127.0.0.1:{port}", "--name", "first"], tmp_path) as broker:
        broker.wait_ready(port)
        assert broker.stop() == 0
        log = broker.log()
    assert f"hpfeeds3 {__version__}: broker 'first' serving" in log, log
    assert log.rstrip().endswith("broker stopped"), log


def test_a_broker_that_never_started_does_not_say_it_stopped(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("--bind", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "address already in use" in result.stderr
    assert "broker stopped" not in result.stderr and "serving" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    a, b = trustme.CA().issue_cert("localhost"), trustme.CA().issue_cert("localhost")
    files = {"crt": folder / "a.crt", "key": folder / "a.key", "other_key": folder / "b.key"}
    a.cert_chain_pems[0].write_to_path(str(files["crt"]))
    a.private_key_pem.write_to_path(str(files["key"]))
    b.private_key_pem.write_to_path(str(files["other_key"]))
    return files


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("missing certificate", 1, "cannot read TLS file"),
        ("certificate and key do not match", 1, "cannot load TLS certificate"),
        ("auth store that cannot be opened", 1, "cannot open sqlite"),
        ("malformed --auth", 2, "unknown store 'bogus'"),
        ("malformed --bind", 2, "port 99999 is out of range"),
        ("--tlscert without --tlskey", 2, "must be given together"),
        ("certificate and key swapped", 1, "swapped"),
        ("--cluster-user alone", 2, "must be given together"),
        ("--cluster with an http:// URL", 2, "nats://"),
        ("JSON auth file that does not parse", 1, "not valid JSON"),
    ],
)
def test_exit_codes_are_the_ones_help_states(
    case: str, code: int, says: str, tls_files: dict[str, Path], tmp_path: Path
) -> None:
    bind = f"127.0.0.1:{free_port()}"
    args = {
        "missing certificate": ["--bind", bind, "--tlscert", "nope.crt", "--tlskey", str(tls_files["key"])],
        "certificate and key do not match": [
            "--bind",
            bind,
            "--tlscert",
            str(tls_files["crt"]),
            "--tlskey",
            str(tls_files["other_key"]),
        ],
        "auth store that cannot be opened": ["--bind", bind, "--auth", "sqlite:no/such/dir/keys.db"],
        "malformed --auth": ["--bind", bind, "--auth", "bogus"],
        "malformed --bind": ["--bind", "127.0.0.1:99999"],
        "--tlscert without --tlskey": ["--bind", bind, "--tlscert", str(tls_files["crt"])],
        "certificate and key swapped": ["--bind", bind, "--tlscert", str(tls_files["key"]),
                                        "--tlskey", str(tls_files["crt"])],
        "--cluster-user alone": ["--bind", bind, "--cluster", "nats://127.0.0.1:4222", "--cluster-user", "b1"],
        "--cluster with an http:// URL": ["--bind", bind, "--cluster", "http://127.0.0.1:4222"],
        "JSON auth file that does not parse": ["--bind", bind, "--auth", "bad.json"],
    }[case]  # fmt: skip
    (tmp_path / "bad.json").write_text('{"a": ')
    result = _run(*args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (case, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("hpfeeds-broker: error: ") and says in lines[0], lines
    # Each thing said once: no file name or address twice in one line.
    for name in re.findall(r"[\w./-]+\.(?:json|crt|key|db)\b", lines[0]):
        assert lines[0].count(name) == 1, lines[0]


def test_help_states_the_exit_codes(tmp_path: Path) -> None:
    text = _run("--help", cwd=tmp_path).stdout
    block = text[text.index("exit status:") :]
    assert re.search(r"^  1  cannot start: .*certificate", block, re.M | re.S)
    assert "certificate and key that do not match" in block
    assert re.search(r"^  2  bad usage: .*--auth SPEC", block, re.M | re.S)


def test_extra_tls_endpoint_without_interface_listens_on_the_bind_host(
    tls_files: dict[str, Path], tmp_path: Path
) -> None:
    port, tls_port = free_port(), free_port()
    argv = [
        str(BROKER),
        "--bind",
        f"127.0.0.1:{port}",
        "-e",
        f"tls:port={tls_port}:cert={tls_files['crt']}:key={tls_files['key']}",
    ]
    with running_broker(argv, tmp_path) as broker:
        broker.wait_ready(port)
        assert broker.stop() == 0
        log = broker.log()
    assert f"listening on tls://127.0.0.1:{tls_port}" in log, log
    assert "0.0.0.0" not in log, log


@pytest.mark.parametrize("path", [REPO / "README.md", REPO / "docs" / "client.md"], ids=lambda p: p.name)
def test_python_examples_run_as_scripts(path: Path) -> None:
    """Each example compiles as a file of its own (no top-level ``await`` or ``async with``)."""
    examples = re.findall(r"^```python\n(.*?)^```$", path.read_text(), re.M | re.S)
    assert examples
    for example in examples:
        compile(example, f"{path.name} example", "exec")


def test_each_worker_says_which_it_is(tmp_path: Path) -> None:
    from tests.support.nats import NatsServer

    nats = NatsServer(tmp_path).start()
    try:
        port = free_port()
        argv = [str(BROKER), "--bind", f"127.0.0.1:{port}", "--cluster", nats.url, "--workers", "2"]
        with running_broker(argv, tmp_path) as broker:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and broker.log().count("serving") < 2:
                time.sleep(0.1)
            assert broker.stop() == 0
            log = broker.log()
    finally:
        nats.stop()
    for index in (0, 1):
        assert re.search(rf"hpfeeds3\.broker worker {index}: hpfeeds3 {re.escape(__version__)}: broker", log), log
    worker_lines = [line for line in log.splitlines() if " hpfeeds3.broker " in line and "serving" in line]
    assert len(worker_lines) == 2 and all(" worker " in line for line in worker_lines), log


def test_unreachable_postgresql_warning_is_a_whole_sentence(tmp_path: Path) -> None:
    port = free_port()
    argv = [str(BROKER), "--bind", f"127.0.0.1:{port}", "--auth", f"postgresql://u:pw@127.0.0.1:{free_port()}/db"]
    with running_broker(argv, tmp_path) as broker:
        broker.wait_ready(port)
        assert broker.stop() == 0
        log = broker.log()
    (warning,) = [line for line in log.splitlines() if "not reachable at start" in line]
    assert warning.endswith("until it is reachable (retrying in the background)"), warning
    assert "pw" not in warning, "the password is redacted"


def test_console_token_command_runs_without_a_warning(tmp_path: Path) -> None:
    # docs/console.md's first command. Importing the console package must not
    # import the tokens module first (runpy's "found in sys.modules" warning).
    from .support import PYTHON

    result = subprocess.run(
        [PYTHON, "-W", "error", "-m", "hpfeeds3.broker.admin.tokens", "alice", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"alice admin sha256:[0-9a-f]{64}\n", result.stdout), result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("token (shown once): "), result.stderr
