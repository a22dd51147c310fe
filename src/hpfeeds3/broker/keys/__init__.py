"""Access-key management: stores that read and write keys, and the ``keys`` CLI.

``open_store(spec)`` opens sqlite, JSON or PostgreSQL from a spec written like
the broker's ``--auth``; ``cli.main(argv)`` is ``hpfeeds-broker keys``.
"""

from .errors import (
    BadArguments,
    ExitCode,
    IdentExists,
    InvalidKey,
    KeyStoreError,
    NoSuchIdent,
    StoreUnavailable,
)
from .store import KeyStore, StoreSpec, open_store, parse_store_spec, redact_dsn

__all__ = [
    "BadArguments",
    "ExitCode",
    "IdentExists",
    "InvalidKey",
    "KeyStore",
    "KeyStoreError",
    "NoSuchIdent",
    "StoreSpec",
    "StoreUnavailable",
    "open_store",
    "parse_store_spec",
    "redact_dsn",
]
