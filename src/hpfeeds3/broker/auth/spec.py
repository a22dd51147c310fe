"""The one parser of store specs, for the broker's ``--auth`` and ``keys --auth`` alike.

==============================  ===============================================
``sqlite``                      ``./sqlite.db`` (the default)
``sqlite:PATH``                 an sqlite file (the reference's schema)
``env``                         ``HPFEEDS_<IDENT>_SECRET`` ... (read-only)
``PATH.json``                   a JSON file ``{ident: {owner, secret, ...}}``
``postgresql://user:pw@h/db``   a PostgreSQL database (``postgres://`` too)
==============================  ===============================================

A spec is taken as written: no surrounding spaces, no empty path. Adding a
backend is one module, and one line in ``_BACKENDS`` naming how its spec
looks and where its class is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..redact import redact_url
from .base import BadSpec, KeyReader
from .sqlite import DEFAULT_PATH

ACCEPTED = "sqlite, sqlite:PATH, env, PATH.json or postgresql://user:password@host:port/db"


def _sqlite(spec: str) -> str | None:
    if spec == "sqlite":
        return DEFAULT_PATH
    if not spec.startswith("sqlite:"):
        return None
    if spec == "sqlite:":
        raise BadSpec(f"store {spec!r}: sqlite:PATH needs a path")
    return spec[len("sqlite:") :]


def _env(spec: str) -> str | None:
    return "" if spec == "env" else None


def _postgresql(spec: str) -> str | None:
    return spec if spec.startswith(("postgresql://", "postgres://")) else None


def _json(spec: str) -> str | None:
    return spec if spec.lower().endswith(".json") and spec.strip() == spec else None


# One line per backend: its kind, how a spec names it (the target, or None),
# and "module:Class", imported only when used (asyncpg only for PostgreSQL).
_BACKENDS: tuple[tuple[str, Callable[[str], str | None], str], ...] = (
    ("sqlite", _sqlite, "sqlite:SqliteStore"),
    ("env", _env, "env:EnvStore"),
    ("postgresql", _postgresql, "postgres:PostgresStore"),
    ("json", _json, "jsonfile:JsonStore"),
)


@dataclass(frozen=True, slots=True)
class StoreSpec:
    kind: str  # a kind of _BACKENDS
    target: str  # a path, a DSN, or "" for env

    def describe(self) -> str:
        return redact_url(self.target) if self.kind == "postgresql" else self.target or self.kind


def parse_spec(spec: str) -> StoreSpec:
    """Parse one store spec; ``BadSpec`` (a ``ConfigError``) names the accepted forms."""
    for kind, match, _where in _BACKENDS:
        target = match(spec)
        if target is not None:
            return StoreSpec(kind, target)
    raise BadSpec(f"unknown store {redact_url(spec)!r}: expected {ACCEPTED}")


def open_backend(spec: str | StoreSpec, *, poll_s: float = 1.0) -> Any:
    """The store object for ``spec``, not started or opened yet.

    Every backend class has ``from_spec(target, poll_s=...)``; ``poll_s`` is how
    often a polled store (sqlite) checks for changes.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    where = next(where for kind, _match, where in _BACKENDS if kind == parsed.kind)
    module_name, _, class_name = where.partition(":")
    cls = getattr(importlib.import_module(f"{__package__}.{module_name}"), class_name)
    return cls.from_spec(parsed.target, poll_s=poll_s)


def build_authenticator(specs: Sequence[str], *, poll_s: float = 1.0) -> KeyReader:
    """The broker's reader: one store, or a chain of them in order."""
    from .chain import ChainStore

    backends = [open_backend(s, poll_s=poll_s) for s in specs]
    return backends[0] if len(backends) == 1 else ChainStore(backends)
