"""Key stores: one module per backend, read by the broker and written by ``keys``.

``base`` holds the key, its validation, the errors and the capabilities;
``records`` the JSON codec; ``spec`` the one spec parser (``--auth``);
``sqlite``, ``jsonfile``, ``env``, ``postgres`` and ``chain`` the backends.
"""

from __future__ import annotations

from .base import (
    AccessKey,
    Authenticator,
    AuthUnavailable,
    ChangeFeed,
    KeyReader,
    KeyWriter,
    StoreUnavailable,
    SyncLookup,
    WouldBlock,
)
from .spec import StoreSpec, build_authenticator, open_backend, parse_spec

__all__ = [
    "AccessKey",
    "AuthUnavailable",
    "Authenticator",
    "ChangeFeed",
    "KeyReader",
    "KeyWriter",
    "StoreSpec",
    "StoreUnavailable",
    "SyncLookup",
    "WouldBlock",
    "build_authenticator",
    "open_backend",
    "parse_spec",
]
