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
