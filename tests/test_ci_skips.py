"""Under CI=true a skip fails the run unless tests/conftest.py allows its reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import pytest

def test_allowed():
    pytest.skip("no IPv6 loopback")

def test_not_allowed():
    pytest.skip("some tool is not installed")

@pytest.mark.skipif(True, reason="a marker without an allowed reason")
def test_marker():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    assert False
"""


def run_probe(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-rA", "test_probe.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_under_ci_only_allowed_skips_pass(tmp_path: Path) -> None:
    r = run_probe(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    assert "SKIPPED [1] test_probe.py:5: no IPv6 loopback" in r.stdout
    assert "FAILED test_probe.py::test_not_allowed - skipped under CI=true ('some tool is not installed')" in r.stdout
    assert "ERROR test_probe.py::test_marker - skipped under CI=true ('a marker without an allowed reason')" in r.stdout
    assert "XFAIL test_probe.py::test_xfail" in r.stdout


def test_outside_ci_skips_stay_skips(tmp_path: Path) -> None:
    r = run_probe(tmp_path, "")
    assert r.returncode == 0, r.stdout
    assert "3 skipped, 1 xfailed" in r.stdout
