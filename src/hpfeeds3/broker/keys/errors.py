"""Errors of key management, each with the exit code the ``keys`` CLI returns.

Who is at fault is in the class: the operator typed something wrong
(``BadArguments``, ``InvalidKey``), the store says no (``IdentExists``,
``NoSuchIdent``), or the store could not be reached (``StoreUnavailable``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # Anything unexpected (a bug): the traceback goes to stderr.
    FAILURE = 1
    # Bad arguments, unknown store spec, unreadable or malformed import file.
    BAD_ARGUMENTS = 2
    IDENT_EXISTS = 3
    NO_SUCH_IDENT = 4
    # The store cannot be reached, is locked beyond the busy timeout, or is not a key store.
    STORE_UNAVAILABLE = 5
    # An ident or channel name is empty or over 255 bytes of UTF-8, or a key is malformed.
    INVALID_KEY = 6


class KeyStoreError(Exception):
    """Base: a one-line message for the operator and an exit code."""

    exit_code: ExitCode = ExitCode.FAILURE


class BadArguments(KeyStoreError):
    exit_code = ExitCode.BAD_ARGUMENTS


class IdentExists(KeyStoreError):
    exit_code = ExitCode.IDENT_EXISTS

    def __init__(self, idents: str | list[str]) -> None:
        self.idents = [idents] if isinstance(idents, str) else list(idents)
        shown = ", ".join(repr(i) for i in self.idents[:10]) + (" ..." if len(self.idents) > 10 else "")
        super().__init__(f"ident already exists: {shown}")


class NoSuchIdent(KeyStoreError):
    exit_code = ExitCode.NO_SUCH_IDENT

    def __init__(self, ident: str) -> None:
        self.ident = ident
        super().__init__(f"no such ident: {ident!r}")


class StoreUnavailable(KeyStoreError):
    exit_code = ExitCode.STORE_UNAVAILABLE


class InvalidKey(KeyStoreError):
    exit_code = ExitCode.INVALID_KEY
