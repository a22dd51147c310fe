"""docs/operations.md names only files that exist, and its commands match the files."""

from __future__ import annotations

import re

from .support import REPO

DOC = REPO / "docs" / "operations.md"


def test_every_repository_path_in_the_doc_exists() -> None:
    text = DOC.read_text()
    paths = set(re.findall(r"`((?:deploy|docs|tests)/[\w./-]+)`", text))
    assert paths, "the doc names the repository's files"
    missing = sorted(p for p in paths if not (REPO / p.rstrip("/")).exists())
    assert not missing, missing
    for name in re.findall(r"`([\w-]+\.yml)`", text):
        assert (REPO / "deploy" / "compose" / name).exists() or name == "prometheus.yml", name


def test_doc_states_the_image_uid_and_the_default_ports() -> None:
    text = DOC.read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile, re.S).group(1)
    assert f"uid/gid **{uid}**" in text and f"{uid}:{uid}" in text
    assert "0.0.0.0:10000" in text and "0.0.0.0:20000" in text and "9431" in text


def commands(text: str) -> list[str]:
    """Every line of the doc's bash blocks and inline code spans that runs a command."""
    blocks = re.findall(r"^```bash\n(.*?)^```$", text, re.M | re.S)
    lines = [line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()]
    lines += re.findall(r"`((?:docker|docker-compose|sudo|chmod|pip|python3|\.venv/bin/)[^`]*)`", text)
    return [line for line in lines if line and not line.startswith("#")]


def test_every_compose_command_names_its_file() -> None:
    # Without -f, docker-compose looks for docker-compose.yml, which deploy/compose/ does not have.
    for line in commands(DOC.read_text()):
        for part in re.split(r"&&|\|", line):
            if part.strip().startswith("docker-compose "):
                assert re.search(r"docker-compose -f (?:[\w-]+\.yml|FILE) ", part), part


def test_volume_handover_uses_the_volume_compose_mounts() -> None:
    from .test_docker_files import COMPOSE_DIR, compose_config

    volumes = compose_config(COMPOSE_DIR / "sqlite.yml")["volumes"]
    real = volumes["hpfeeds_data"]["name"]
    assert real == "compose_hpfeeds_data", real  # the project (directory) name, prefixed
    text = DOC.read_text()
    assert real in text
    for line in commands(text):
        assert not re.search(r"docker run .*-v hpfeeds_data:", line), line
    (chown,) = [line for line in commands(text) if "--entrypoint chown" in line]
    assert chown.startswith("docker-compose -f sqlite.yml run --rm --user 0 "), chown


def test_the_spec_volume_slip_is_named_with_our_fix() -> None:
    text = " ".join(DOC.read_text().split())
    assert "declare the volume `hpfeeds_userdb` but mount `hpfeeds_data`" in text
    assert "declare and mount the same name, `hpfeeds_data`" in text


def test_key_permissions_line_works_for_a_user_who_is_not_root() -> None:
    # After `sudo chown 10000` the file is no longer the user's: chmod must come first.
    for line in commands(DOC.read_text()):
        if "chown" in line and "chmod" in line:
            assert line.index("chmod") < line.index("chown"), line


def test_install_recipes_use_a_virtual_environment() -> None:
    # Debian's and Ubuntu's system pip refuses to install (externally-managed-environment).
    for line in commands(DOC.read_text()):
        for part in re.split(r"&&|;", line):
            words = part.split()
            if len(words) > 1 and ("pip" in words[:1] or words[1:3] == ["-m", "pip"] or "install" in words[1:2]):
                assert words[0].endswith("/bin/pip") or words[0].endswith("/bin/python"), part
    assert "python3-venv" in DOC.read_text() and "python3-venv" in (REPO / "README.md").read_text()
