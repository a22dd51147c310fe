"""Access keys as values: validation, secrets, and the JSON document formats.

Our JSON format (the JSON store, ``keys export``)::

    {"sensor1": {"owner": "alice", "secret": "...", "pubchans": ["cowrie.sessions"], "subchans": []}}

On import we also accept a list of objects (a JSON array, or one object per
line as ``mongoexport`` writes it) with the reference broker's MongoDB-era
field names: ``identifier``, ``secret``, ``publish``, ``subscribe`` (``owner``
optional; unknown fields such as ``_id`` are ignored).
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..auth.base import AccessKey
from .errors import BadArguments, InvalidKey

# An ident or a channel travels in a str8 field: one length byte.
MAX_NAME_BYTES = 255
# Bytes of randomness in a generated secret (192 bits; at least 128 required).
SECRET_BYTES = 24

_IDENT_FIELDS = ("ident", "identifier")
_PUB_FIELDS = ("pubchans", "publish")
_SUB_FIELDS = ("subchans", "subscribe")


def generate_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def check_name(what: str, value: object) -> str:
    """An ident or channel: a non-empty str of at most 255 bytes of UTF-8."""
    if not isinstance(value, str):
        raise InvalidKey(f"{what} must be a string, got {value!r}")
    if value == "":
        raise InvalidKey(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey(f"{what} {value!r} is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise InvalidKey(f"{what} {value[:40]!r}... is {size} bytes of UTF-8, at most {MAX_NAME_BYTES} allowed")
    return value


def check_channels(what: str, channels: Iterable[object]) -> tuple[str, ...]:
    """Validated channels, duplicates dropped, order kept."""
    out: dict[str, None] = {}
    for channel in channels:
        out[check_name(what, channel)] = None
    return tuple(out)


def make_key(
    ident: object,
    secret: object,
    owner: object = "",
    pubchans: Iterable[object] = (),
    subchans: Iterable[object] = (),
) -> AccessKey:
    """A validated ``AccessKey``; ``InvalidKey`` says what is wrong."""
    ident = check_name("ident", ident)
    if not isinstance(secret, str) or secret == "":
        raise InvalidKey(f"ident {ident!r}: secret must be a non-empty string")
    if owner is None:
        owner = ""
    if not isinstance(owner, str):
        raise InvalidKey(f"ident {ident!r}: owner must be a string, got {owner!r}")
    return AccessKey(
        ident=ident,
        secret=secret,
        owner=owner,
        pubchans=check_channels(f"ident {ident!r}: publish channel", pubchans),
        subchans=check_channels(f"ident {ident!r}: subscribe channel", subchans),
    )


def key_to_record(key: AccessKey, *, with_secret: bool = True) -> dict[str, Any]:
    """The value of one entry of our JSON format (the ident is the entry's name)."""
    record: dict[str, Any] = {"owner": key.owner}
    if with_secret:
        record["secret"] = key.secret
    record["pubchans"] = list(key.pubchans)
    record["subchans"] = list(key.subchans)
    return record


def dump_keys(keys: Iterable[AccessKey]) -> str:
    """Our JSON format, sorted by ident, with secrets: what ``export`` writes."""
    doc = {k.ident: key_to_record(k) for k in sorted(keys, key=lambda k: k.ident)}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _field(record: Mapping[str, Any], names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        if name in record:
            return record[name]
    return default


def _channels(ident: str, what: str, value: Any) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        # A JSON list in a string, as in the sqlite TEXT column.
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidKey(f"ident {ident!r}: {what} must be a list of channels, got {value!r}") from None
    if not isinstance(value, list):
        raise InvalidKey(f"ident {ident!r}: {what} must be a list of channels, got {value!r}")
    return value


def key_from_record(record: Mapping[str, Any], ident: object = None) -> AccessKey:
    """One key from a JSON object in our format or the MongoDB-era one."""
    if not isinstance(record, Mapping):
        raise InvalidKey(f"a key must be a JSON object, got {record!r}")
    if ident is None:
        ident = _field(record, _IDENT_FIELDS)
        if ident is None:
            raise InvalidKey(f"key has no 'ident' or 'identifier' field: {dict(record)!r}"[:200])
    name = str(ident)
    return make_key(
        ident,
        _field(record, ("secret",)),
        _field(record, ("owner",), ""),
        _channels(name, "publish channels", _field(record, _PUB_FIELDS)),
        _channels(name, "subscribe channels", _field(record, _SUB_FIELDS)),
    )


def parse_keys(text: str, source: str = "input") -> list[AccessKey]:
    """Keys from a JSON document: our mapping, a JSON array, or JSON lines.

    Malformed JSON is ``BadArguments`` (the file is not what the operator
    thinks); a well-formed document with a bad key is ``InvalidKey``.
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
        if any(name in doc for name in ("secret", *_IDENT_FIELDS)):
            doc = [doc]  # a single key object
        else:
            return [key_from_record(record, ident) for ident, record in doc.items()]
    if not isinstance(doc, list):
        raise BadArguments(f"{source}: expected a JSON object of keys or a list of keys")
    keys = [key_from_record(record) for record in doc]
    dupes = sorted(ident for ident, n in Counter(k.ident for k in keys).items() if n > 1)
    if dupes:
        raise InvalidKey(f"{source}: ident appears more than once: {', '.join(map(repr, dupes))}")
    return keys
