"""Console access tokens: a file of named tokens, each with a role; only hashes at rest.

The token file (``--admin-tokens FILE``) holds one token per line::

    # name   role    sha256 of the token (hex)
    alice    admin   sha256:6b3a55e0261b0304143f805a24924d0c1c44524821305f31d9277843b8a10f4e
    grafana  viewer  sha256:...

Blank lines and ``#`` comments are ignored. A name is letters, digits and
``._@-``; a role is ``viewer`` (reads everything but payloads) or ``admin``
(also changes keys, disconnects clients, watches payloads). Tokens are random
(256 bits), so one SHA-256 is enough: there is nothing to guess from a hash.

Make one with ``python -m hpfeeds3.broker.admin.tokens NAME ROLE``: it prints
the token once (give it to the person) and the line to add to the file. The
file is read when the console starts and again whenever it changes.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import secrets
import sys
from dataclasses import dataclass

from ..config import ConfigError

ROLES = ("viewer", "admin")
TOKEN_PREFIX = "hpfc_"
# Bytes of randomness in a generated token.
TOKEN_BYTES = 32
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_HASH = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: the token's name and role."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def parse_tokens(text: str, source: str = "token file") -> dict[str, Principal]:
    """Hash (hex) → principal; ``ConfigError`` names the bad line."""
    found: dict[str, Principal] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"{source} line {number}: expected 'NAME ROLE sha256:HEX'")
        name, role, digest = parts
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{source} line {number}: name must be 1-64 of letters, digits and ._@-")
        if role not in ROLES:
            raise ConfigError(f"{source} line {number}: role must be one of {', '.join(ROLES)}, got {role!r}")
        m = _HASH.fullmatch(digest.lower())
        if not m:
            raise ConfigError(f"{source} line {number}: expected sha256: and 64 hex digits")
        if name in names:
            raise ConfigError(f"{source} line {number}: name {name!r} appears twice")
        names.add(name)
        found[m.group(1)] = Principal(name, role)
    if not found:
        raise ConfigError(f"{source}: no tokens; make one with python -m hpfeeds3.broker.admin.tokens NAME ROLE")
    return found


class TokenFile:
    """The token file, re-read when its modification time or size changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, Principal] = {}
        self.reload()

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"--admin-tokens {self.path!r}: cannot read: {e.strerror}") from None
        # Stamped first: a file that does not parse is reported once, not at every request.
        self._stamp = stamp
        self._tokens = parse_tokens(text, f"--admin-tokens {self.path}")

    def current(self, principal: Principal) -> bool:
        """Whether ``principal`` (of a session) is still in the file with the same role."""
        return principal in self._tokens.values()

    def check(self, token: str) -> Principal | None:
        """The principal of ``token``, or ``None``."""
        if not token or len(token) > 512:
            return None
        digest = hash_token(token)
        found = None
        # Compare against every hash in constant time per entry.
        for known, principal in self._tokens.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hpfeeds3.broker.admin.tokens",
        description="Make a console access token: prints the token once and the line for --admin-tokens.",
    )
    p.add_argument("name", help="who or what uses the token (letters, digits, ._@-)")
    p.add_argument("role", choices=ROLES)
    args = p.parse_args(argv)
    if not _NAME.fullmatch(args.name):
        p.error("name must be 1-64 of letters, digits and ._@-")
    token = generate_token()
    print(f"token (shown once): {token}", file=sys.stderr)
    print(f"{args.name} {args.role} sha256:{hash_token(token)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
