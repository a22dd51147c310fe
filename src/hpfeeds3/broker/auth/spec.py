"""The one parser of store specs, for the broker's ``--auth`` and ``keys --auth`` alike.

==============================  ===============================================
``sqlite``                      ``./sqlite.db`` (the default)
``sqlite:PATH``                 an sqlite file (the reference's schema)
``env``                         ``HPFEEDS_<IDENT>_SECRET`` ... (read-only)
``PATH.json``                   a JSON file ``{ident: {owner, secret, ...}}``
``postgresql://user:pw@h/db``   a PostgreSQL database (``postgres://`` too)
==============================  ===============================================

A spec is taken as written: no surrounding spaces, no empty path. Adding a
backend is one module, and one ``Backend`` in ``BACKENDS`` naming how its spec
looks, where its class is, and the forms its spec takes, from which the
accepted forms of every error and the ``--auth`` help of ``hpfeeds-broker``
are derived.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..redact import redact_url
from .base import BadSpec, KeyReader
from .sqlite import DEFAULT_PATH


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


@dataclass(frozen=True, slots=True)
class Backend:
    """One key store: its kind, how a spec names it (the target, or None), where its
    class is ("module:Class", imported only when used: asyncpg only for PostgreSQL),
    whether ``keys`` and the console can write it, and its spec forms with a line each."""

    kind: str
    match: Callable[[str], str | None]
    where: str
    writable: bool
    forms: tuple[tuple[str, str], ...]


BACKENDS: tuple[Backend, ...] = (
    Backend(
        "sqlite",
        _sqlite,
        "sqlite:SqliteStore",
        True,
        (
            ("sqlite", "./sqlite.db, the reference broker's authkeys table (default)"),
            ("sqlite:PATH", "another sqlite file"),
        ),
    ),
    Backend(
        "env",
        _env,
        "env:EnvStore",
        False,
        (("env", "HPFEEDS_<IDENT>_SECRET, _PUBCHANS, _SUBCHANS, _OWNER (ident lower-case)"),),
    ),
    Backend(
        "postgresql",
        _postgresql,
        "postgres:PostgresStore",
        True,
        (("postgresql://user:password@host:port/db", "a shared PostgreSQL store"),),
    ),
    Backend(
        "json",
        _json,
        "jsonfile:JsonStore",
        True,
        (("PATH.json", '{"ident": {"owner", "secret", "pubchans", "subchans"}}, reloaded on change'),),
    ),
)
_ORDER = ("sqlite", "env", "json", "postgresql")  # as the forms are listed to people
_FORMS = [form for kind in _ORDER for b in BACKENDS if b.kind == kind for form in b.forms]
ACCEPTED = ", ".join(f for f, _ in _FORMS[:-1]) + f" or {_FORMS[-1][0]}"


def backend(kind: str) -> Backend:
    return next(b for b in BACKENDS if b.kind == kind)


def forms_help(indent: str = "  ", width: int = 20) -> str:
    """The spec forms, one line each (a long form on a line of its own), for a --help epilog."""
    lines = []
    for form, what in _FORMS:
        if len(form) < width:
            lines.append(f"{indent}{form:<{width}}{what}")
        else:
            lines += [f"{indent}{form}", f"{indent}{'':<{width}}{what}"]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class StoreSpec:
    kind: str  # a kind of BACKENDS
    target: str  # a path, a DSN, or "" for env

    def describe(self) -> str:
        return redact_url(self.target) if self.kind == "postgresql" else self.target or self.kind


def parse_spec(spec: str) -> StoreSpec:
    """Parse one store spec; ``BadSpec`` (a ``ConfigError``) names the accepted forms."""
    for b in BACKENDS:
        target = b.match(spec)
        if target is not None:
            return StoreSpec(b.kind, target)
    raise BadSpec(f"unknown store {redact_url(spec)!r}: expected {ACCEPTED}")


def open_backend(spec: str | StoreSpec, *, poll_s: float = 1.0) -> Any:
    """The store object for ``spec``, not started or opened yet.

    Every backend class has ``from_spec(target, poll_s=...)``; ``poll_s`` is how
    often a polled store (sqlite) checks for changes.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    module_name, _, class_name = backend(parsed.kind).where.partition(":")
    cls = getattr(importlib.import_module(f"{__package__}.{module_name}"), class_name)
    return cls.from_spec(parsed.target, poll_s=poll_s)


def build_authenticator(specs: Sequence[str], *, poll_s: float = 1.0) -> KeyReader:
    """The broker's reader: one store, or a chain of them in order."""
    from .chain import ChainStore

    backends = [open_backend(s, poll_s=poll_s) for s in specs]
    return backends[0] if len(backends) == 1 else ChainStore(backends)
