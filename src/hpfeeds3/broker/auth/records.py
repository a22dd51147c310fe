"""Access keys as JSON documents: the one codec for every accepted shape.

Our format (the JSON store, ``keys export``), a mapping of ident to key::

    {"sensor1": {"owner": "alice", "secret": "...", "pubchans": ["cowrie.sessions"], "subchans": []}}

with ``"durable": true`` on a durable key (written only then; absent is false).

Also accepted (the JSON store read by the broker, ``keys import``): a list of
key objects (a JSON array, or one object per line as ``mongoexport`` writes
it) with our field names or the MongoDB-era ones (``identifier``, ``secret``,
``publish``, ``subscribe``; ``owner`` optional; unknown fields such as
``_id`` ignored), or one key object alone.

A mapping is our format when every value is an object, so an ident may be
named ``ident``, ``identifier`` or ``secret``: a single key object always has
a text ``secret``. Errors never quote a secret.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .base import AccessKey, BadArguments, InvalidKey, decode_channels, make_key

# Bytes of randomness in a generated secret (192 bits; at least 128 required).
SECRET_BYTES = 24

_IDENT_FIELDS = ("ident", "identifier")
_PUB_FIELDS = ("pubchans", "publish")
_SUB_FIELDS = ("subchans", "subscribe")


def generate_secret() -> str:
    """A random secret (``SECRET_BYTES`` of entropy, URL-safe base64) that does not
    start with ``-``: it is pasted after ``-s`` on command lines, where a leading
    dash reads as an option (``hpfeeds publish -s -Xy…`` fails)."""
    while True:
        secret = secrets.token_urlsafe(SECRET_BYTES)
        if not secret.startswith("-"):
            return secret


def key_to_record(key: AccessKey, *, with_secret: bool = True) -> dict[str, Any]:
    """The value of one entry of our JSON format (the ident is the entry's name)."""
    record: dict[str, Any] = {"owner": key.owner}
    if with_secret:
        record["secret"] = key.secret
    record["pubchans"] = list(key.pubchans)
    record["subchans"] = list(key.subchans)
    if key.durable:
        record["durable"] = True
    return record


def dump_keys(keys: Iterable[AccessKey]) -> str:
    """Our JSON format, sorted by ident, with secrets: what ``export`` and the JSON store write."""
    doc = {k.ident: key_to_record(k) for k in sorted(keys, key=lambda k: k.ident)}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _field(record: Mapping[str, Any], names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        if name in record:
            return record[name]
    return default


def key_from_record(record: object, ident: object = None) -> AccessKey:
    """One key from a JSON object in our format or the MongoDB-era one."""
    where = f"ident {ident!r}" if isinstance(ident, str) else "a key"
    if not isinstance(record, Mapping):
        raise InvalidKey(f"{where} must be a JSON object, got {type(record).__name__}")
    if ident is None:
        ident = _field(record, _IDENT_FIELDS)
        if ident is None:
            raise InvalidKey(f"a key has no 'ident' or 'identifier' field (fields: {', '.join(map(str, record))})")
    name = ident if isinstance(ident, str) else ""
    return make_key(
        ident,
        _field(record, ("secret",)),
        _field(record, ("owner",), ""),
        decode_channels(name, "publish channels", _field(record, _PUB_FIELDS)),
        decode_channels(name, "subscribe channels", _field(record, _SUB_FIELDS)),
        _field(record, ("durable",), False),
    )


def _is_keyed_mapping(doc: Mapping[str, Any]) -> bool:
    """Our format: every value is a key object (a single key has a text secret)."""
    return all(isinstance(value, Mapping) for value in doc.values())


def parse_keys(
    text: str, source: str = "input", *, skip_invalid: Callable[[str, InvalidKey], None] | None = None
) -> list[AccessKey]:
    """Keys from a JSON document in any accepted shape.

    Malformed JSON is ``BadArguments`` (the file is not what the operator
    thinks); a well-formed document with a bad key is ``InvalidKey``, unless
    ``skip_invalid`` is given: then a key whose ident is known but whose
    fields are not valid is handed to it and left out (the broker serves the
    others and answers "no such key" for that one).
    """
    try:
        doc: Any = json.loads(text) if text.strip() else {}
    except ValueError as err:
        try:
            # mongoexport without --jsonArray: one object per line.
            doc = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise BadArguments(f"{source}: not valid JSON ({err})") from None
    if isinstance(doc, Mapping):
        # our format, or a single key object
        doc = list(doc.items()) if _is_keyed_mapping(doc) else [(None, doc)]
    elif isinstance(doc, list):
        doc = [(None, record) for record in doc]
    else:
        raise BadArguments(f"{source}: expected a JSON object of keys or a list of keys")
    keys: list[AccessKey] = []
    for ident, record in doc:
        try:
            keys.append(key_from_record(record, ident))
        except InvalidKey as err:
            name = ident if ident is not None else _ident_of(record)
            if skip_invalid is None or not isinstance(name, str):
                raise
            skip_invalid(name, err)
    dupes = sorted(ident for ident, n in Counter(k.ident for k in keys).items() if n > 1)
    if dupes:
        raise InvalidKey(f"{source}: ident appears more than once: {', '.join(map(repr, dupes))}")
    return keys


def _ident_of(record: object) -> object:
    return _field(record, _IDENT_FIELDS) if isinstance(record, Mapping) else None
