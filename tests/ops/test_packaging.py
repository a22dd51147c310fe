"""The wheel builds with the build backend pyproject.toml asks for, with every
warning an error: a deprecation the backend announces (the TOML-table
``project.license``, refused after 2027-02-18) fails here, not on a user's
fresh install the day the backend drops it (pip hides the backend's warnings).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from .support import REPO, copy_checkout

BUILD_TIMEOUT_S = 300.0

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 60)


def build_requires() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]


def test_build_backend_is_bounded_above() -> None:
    # A fresh install resolves the newest backend the bounds allow: an upper
    # bound keeps that one a backend this project has been built with.
    (setuptools,) = [r for r in build_requires() if r.startswith("setuptools")]
    assert ">=" in setuptools and "<" in setuptools.replace("<=", ""), setuptools


def test_license_is_an_spdx_expression() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


def test_wheel_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    # The backend exactly as build isolation would pick it (the newest the bounds allow).
    backend = tmp_path / "backend"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(backend), *build_requires()],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # A copy of the checkout (its files as git sees them), so build/ and
    # *.egg-info are not written into the working tree.
    source = copy_checkout(tmp_path / "src")
    out = tmp_path / "dist"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            "import sys, setuptools.build_meta as backend; print(backend.build_wheel(sys.argv[1]))",
            str(out),
        ],
        cwd=source,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(backend), "PYTHONWARNINGS": "error"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (wheel,) = out.glob("hpfeeds3-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode()
    assert "License-Expression: MIT" in text, text[:2000]
