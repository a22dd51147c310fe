"""Frame layout, opcodes and size limits of the hpfeeds wire protocol.

Every frame is ``length:uint32 BE | opcode:u8 | body``; ``length`` counts the
whole frame including its 5-byte header. Limits are checked on that header,
before any body is buffered (see ``codec.Decoder``).

Stdlib only, no I/O.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct(">IB")
HEADER_LEN = HEADER.size  # 5
MiB = 1024 * 1024

DIGEST_LEN = 20  # SHA-1
NONCE_LEN = 4  # several C, Node and Lua clients read exactly 4 bytes
STR8_MAX = 255


class Opcode(IntEnum):
    """The opcodes, spelled once; the ``OP_*`` names are the same numbers as plain ints."""

    ERROR = 0
    INFO = 1
    AUTH = 2
    PUBLISH = 3
    SUBSCRIBE = 4
    UNSUBSCRIBE = 5


OP_ERROR = int(Opcode.ERROR)
OP_INFO = int(Opcode.INFO)
OP_AUTH = int(Opcode.AUTH)
OP_PUBLISH = int(Opcode.PUBLISH)
OP_SUBSCRIBE = int(Opcode.SUBSCRIBE)
OP_UNSUBSCRIBE = int(Opcode.UNSUBSCRIBE)

#: Opcodes each side may receive. A broker receiving INFO or ERROR, or a client
#: receiving AUTH, is talking to something that is not an hpfeeds peer.
CLIENT_TO_BROKER = frozenset({OP_AUTH, OP_PUBLISH, OP_SUBSCRIBE, OP_UNSUBSCRIBE})
BROKER_TO_CLIENT = frozenset({OP_ERROR, OP_INFO, OP_PUBLISH})

DEFAULT_MAX_MESSAGE_BYTES = 1 * MiB  # PUBLISH body; as the reference broker


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Largest whole frame (header included) accepted per opcode."""

    max_publish_frame_bytes: int = HEADER_LEN + DEFAULT_MAX_MESSAGE_BYTES
    # str8(ident) + 20-byte digest
    max_auth_frame_bytes: int = HEADER_LEN + 1 + STR8_MAX + DIGEST_LEN
    # str8(ident) + channel (at most 255 bytes, like every channel name)
    max_subscribe_frame_bytes: int = HEADER_LEN + 1 + STR8_MAX + STR8_MAX
    # str8(name) + nonce; generous so a client accepts brokers with longer nonces
    max_info_frame_bytes: int = HEADER_LEN + 1 + STR8_MAX + 64
    # a human-readable text
    max_error_frame_bytes: int = HEADER_LEN + 64 * 1024

    # accepted -> its table, built once per instance (not a field: no init, repr, eq or hash)
    _tables: dict[frozenset[int], tuple[int, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def table(self, accepted: frozenset[int]) -> tuple[int, ...]:
        """Max frame length indexed by opcode; 0 for an opcode not accepted.

        Built once per (limits, accepted) pair and kept here: every Decoder asks
        for one (a broker twice per connection), and a client or benchmark making
        thousands of connections must not pay for a 256-entry tuple each time.
        A frozenset's hash is computed once, so the lookup is one dictionary probe.
        """
        found = self._tables.get(accepted)
        if found is None:
            found = self._tables[accepted] = _table(self, accepted)
        return found


# Equal limits share their tables (a client may make a FrameLimits per connection).
@functools.lru_cache(maxsize=64)
def _table(limits: FrameLimits, accepted: frozenset[int]) -> tuple[int, ...]:
    by_op = {
        OP_ERROR: limits.max_error_frame_bytes,
        OP_INFO: limits.max_info_frame_bytes,
        OP_AUTH: limits.max_auth_frame_bytes,
        OP_PUBLISH: limits.max_publish_frame_bytes,
        OP_SUBSCRIBE: limits.max_subscribe_frame_bytes,
        OP_UNSUBSCRIBE: limits.max_subscribe_frame_bytes,
    }
    return tuple(by_op[op] if op in accepted else 0 for op in range(256))


DEFAULT_LIMITS = FrameLimits()
