"""``hpfeeds-broker keys``: the command, and the blocking adapter it uses
over the broker's own store objects (``broker/auth``).

``open_store(spec)`` opens sqlite, JSON or PostgreSQL from a spec written like
the broker's ``--auth``; ``cli.main(argv)`` is ``hpfeeds-broker keys``.
"""

from ..auth.base import (
    BadArguments,
    ExitCode,
    IdentExists,
    InvalidKey,
    KeyStoreError,
    NoSuchIdent,
    StoreUnavailable,
)
from .blocking import BlockingStore, open_store

__all__ = [
    "BadArguments",
    "BlockingStore",
    "ExitCode",
    "IdentExists",
    "InvalidKey",
    "KeyStoreError",
    "NoSuchIdent",
    "StoreUnavailable",
    "open_store",
]
