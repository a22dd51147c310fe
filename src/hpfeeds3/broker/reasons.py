"""Why a connection ended, or why a frame was refused: one enum feeds the
ERROR frame's token, the log line, the metric label and the tests."""

from __future__ import annotations

from enum import StrEnum


class CloseReason(StrEnum):
    CLIENT_CLOSED = "client_closed"  # the peer closed (EOF)
    CONNECTION_RESET = "connection_reset"  # the socket failed (RST, timeout)
    BAD_FRAME = "bad_frame"  # malformed frame, unknown or unexpected opcode
    FRAME_TOO_LARGE = "frame_too_large"  # header declared more than the opcode's cap
    NOT_AUTHENTICATED = "not_authenticated"  # first frame was not AUTH
    AUTH_TIMEOUT = "auth_timeout"  # no verified AUTH within the deadline
    AUTH_FAILED = "auth_failed"  # unknown ident or wrong secret (indistinguishable)
    AUTH_UNAVAILABLE = "auth_unavailable"  # the key store could not answer
    AUTH_RATE_LIMITED = "auth_rate_limited"  # too many failed AUTHs from this address
    SECOND_AUTH = "second_auth"  # AUTH after a successful AUTH
    TOO_MANY_DENIALS = "too_many_denials"  # denied channels / spoofed idents over the cap
    SLOW_CONSUMER = "slow_consumer"  # subscriber's outgoing buffer over its bounds
    TOO_MANY_CONNECTIONS = "too_many_connections"  # connection cap reached
    TOO_MANY_UNAUTHENTICATED = "too_many_unauthenticated"  # pre-auth cap reached: the oldest is closed
    SLOW_PRODUCER = "slow_producer"  # a frame arrived too slowly, or partial frames held too much memory
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"  # no (valid) TLS handshake within its deadline
    TLS_RECORDS_WITHOUT_DATA = "tls_records_without_data"  # KeyUpdates, empty or tiny records past the bound
    REVOKED = "revoked"  # the key was removed or its secret rotated
    KICKED = "kicked"  # an operator disconnected it (the console)
    REPLACED = "replaced"  # a newer connection of the same durable key consumes it
    SHUTDOWN = "shutdown"  # the broker is stopping
    INTERNAL_ERROR = "internal_error"  # a bug: traceback logged, this connection only


# ERROR frame token per close reason, in the original broker's style.
ERROR_TOKEN = {
    CloseReason.BAD_FRAME: "protocolfail",
    CloseReason.FRAME_TOO_LARGE: "limit",
    CloseReason.NOT_AUTHENTICATED: "authfail",
    CloseReason.AUTH_TIMEOUT: "authfail",
    CloseReason.AUTH_FAILED: "authfail",
    CloseReason.AUTH_UNAVAILABLE: "authfail",
    CloseReason.AUTH_RATE_LIMITED: "authfail",
    CloseReason.SECOND_AUTH: "protocolfail",
    CloseReason.TOO_MANY_DENIALS: "limit",
    CloseReason.SLOW_CONSUMER: "limit",
    CloseReason.TOO_MANY_CONNECTIONS: "limit",
    CloseReason.TOO_MANY_UNAUTHENTICATED: "limit",
    CloseReason.SLOW_PRODUCER: "limit",
    CloseReason.TLS_RECORDS_WITHOUT_DATA: "limit",
    CloseReason.REVOKED: "authfail",
    CloseReason.KICKED: "kicked",
    CloseReason.REPLACED: "replaced",
    CloseReason.SHUTDOWN: "shutdown",
    CloseReason.INTERNAL_ERROR: "internal",
}
