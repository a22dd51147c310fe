"""Fixtures for key management: a real PostgreSQL and one store of each kind."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpfeeds3.broker.keys.cli import main


@pytest.fixture(params=["sqlite", "json", "postgresql"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store spec of each kind, for a store that does not exist yet."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'keys.db'}"
    if request.param == "json":
        return str(tmp_path / "keys.json")
    return str(request.getfixturevalue("postgres_dsn"))


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_keys(*argv: str, stdin: str = "") -> Result:
    """Run ``hpfeeds-broker keys ARGV`` in-process, capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        sys.stdin = saved
    return Result(int(code), out.getvalue(), err.getvalue())


@pytest.fixture
def keys() -> Callable[..., Result]:
    return run_keys
