"""Broker configuration: one frozen object, built from flags, passed down.

Every limit is declared once, as a field of ``Limits`` with its flag, default,
help and whether ``--workers`` divides it (``limit``); ``limit_fields`` lists them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..protocol import HEADER_LEN, FrameLimits, MiB
from .ratelimit import AuthLimits
from .tuning import HELD_BACK_MAX_S

if TYPE_CHECKING:
    from .durable.config import DurableConfig


class ConfigError(Exception):
    """The operator's configuration is wrong: refuse to start with one clear line (exit 1)."""


class UsageError(ConfigError):
    """A flag's value is malformed, whatever the machine: exit 2, as argparse's own errors."""


def limit(default: Any, flag: str, help: str, *, host_wide: bool = False, zero_ok: bool = False) -> Any:
    """A field of ``Limits``, declared once: its default, its flag and the flag's help
    (``--help`` shows the default after it), and whether it is meant for the whole
    host (``--workers`` divides it over the workers: ``supervisor.HOST_WIDE_LIMITS``,
    checked against this by a test). The unit comes from the field's name:
    ``_bytes``, ``_s`` (seconds), else a count; ``zero_ok``: 0 is accepted."""
    return field(default=default, metadata={"flag": flag, "help": help, "host_wide": host_wide, "zero_ok": zero_ok})


@dataclass(frozen=True, slots=True)
class Limits:
    """Every operator limit: the flag table (``cli.LIMIT_FLAGS``), the ``--workers``
    division and the limits tables of SECURITY.md and docs/protocol.md are
    derived from or checked against these fields (``tests/broker/test_cli_config.py``)."""

    # Reference clients reject bigger frames than the reference's 1 MiB.
    max_message_bytes: int = limit(1 * MiB, "--max-message-size", "largest PUBLISH body: ident + channel + payload")
    auth_timeout_s: float = limit(5.0, "--auth-timeout", "accept -> AUTH verified")
    # asyncio's 60 s default is too long.
    tls_handshake_timeout_s: float = limit(10.0, "--tls-handshake-timeout", "TLS handshake deadline")
    max_connections: int = limit(
        10_000,
        "--max-connections",
        "concurrent connections, also kept below the open-files limit; at the limit a connection lingering "
        "after its closing ERROR, else the oldest idle unauthenticated one (of the busiest network), is closed "
        "to make room",
        host_wide=True,
    )
    # Bounds pre-auth memory. Sized for a reconnect storm: a plain connection is idle
    # (no bytes) from INFO to its AUTH, so at the bound a storm's own sensors are
    # evicted; the pool must hold the broker's accept rate (about 13,000/s on one
    # core) times how late sensors answer INFO (SECURITY.md, "Sizing").
    max_unauthenticated: int = limit(
        4_096,
        "--max-unauthenticated",
        "connections that have not authenticated yet, TLS handshakes included; at the limit an idle one of the "
        "busiest network is closed (none making progress), or newcomers wait until a slot frees, "
        f"{HELD_BACK_MAX_S:g} s at most (then they start over the limit)",
        host_wide=True,
    )
    # One host never takes the whole pool.
    max_unauthenticated_per_address: int = limit(
        64,
        "--max-unauthenticated-per-address",
        "of those, from one address (IPv6: one /64); at the limit that address's oldest idle one is closed",
    )
    # A trickled frame cannot pin its buffer for ever (slow_producer).
    min_receive_rate_bytes: int = limit(
        16 * 1024,
        "--min-receive-rate",
        "bytes per second a frame must at least arrive at once its header has come, after a 5 s grace",
    )
    max_partial_frames_bytes: int = limit(
        128 * MiB,
        "--max-partial-frames",
        "bytes held in incomplete frames over all connections; past it connections of the ident (then address group) "
        "holding the most are closed",
    )
    # KeyUpdates, empty or one-byte records: a record's work for no plaintext (tls.py).
    max_tls_records_without_data: int = limit(
        64,
        "--max-tls-records-without-data",
        "TLS records a client may send beyond what their plaintext accounts for (each must bring 16 bytes on "
        "average: KeyUpdates, empty and tiny records fall short); past it the connection is closed "
        "(tls_records_without_data)",
    )
    send_buffer_hard_bytes: int = limit(
        32 * MiB, "--send-buffer-hard", "cut a subscriber at once above this many queued bytes"
    )
    send_buffer_soft_bytes: int = limit(
        8 * MiB, "--send-buffer-soft", "cut a subscriber above this many queued bytes for --send-buffer-soft-window"
    )
    send_buffer_soft_window_s: float = limit(60.0, "--send-buffer-soft-window", "")
    send_stall_timeout_s: float = limit(
        10.0, "--send-stall-timeout", "cut a subscriber when nothing drained for this long while bytes are queued"
    )
    max_subscriptions: int = limit(1_024, "--max-subscriptions", "channels per connection")
    max_denials: int = limit(100, "--max-denials", "refused frames answered with ERROR before the connection is closed")
    # Live sessions of a removed key, a rotated secret or a revoked channel.
    revocation_poll_s: float = limit(
        1.0,
        "--revocation-poll",
        "how often the sqlite store is checked for removed keys, rotated secrets and revoked channels, "
        "which then reach live sessions (JSON files and PostgreSQL notify at once)",
    )
    shutdown_drain_s: float = limit(
        10.0, "--shutdown-drain", "on SIGTERM/SIGINT, time to flush queued output", zero_ok=True
    )
    # Past it local messages are not queued for other nodes but counted as unforwarded.
    cluster_outbox_bytes: int = limit(
        64 * MiB,
        "--cluster-outbox",
        "with --cluster, bytes queued for other nodes while NATS is slow; past it messages are counted as "
        "unforwarded, not queued",
        host_wide=True,
    )
    # Durable keys (docs/durable.md): what the log keeps for each, and what a crash may cost.
    durable_max_bytes: int = limit(
        1024 * MiB,
        "--durable-max-bytes",
        "per durable key, bytes kept for it over its channels; past it its oldest messages are dropped (counted)",
    )
    durable_max_age_s: float = limit(
        24 * 3600.0, "--durable-max-age", "messages older than this are dropped from the durable log (counted)"
    )
    durable_sync_s: float = limit(
        1.0,
        "--durable-sync",
        "fsync the durable log at most this often: what a power loss may cost (0: after every write)",
        zero_ok=True,
    )
    durable_overlap_bytes: int = limit(
        6 * MiB,
        "--durable-overlap",
        "after a durable collector's connection ends without a clean FIN, replay starts this many bytes before "
        "what its TCP acknowledged (at least its receive buffer): duplicates, not loss",
    )

    def frame_limits(self) -> FrameLimits:
        return FrameLimits(max_publish_frame_bytes=HEADER_LEN + self.max_message_bytes)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One listening socket: ``tcp`` or ``tls``, optionally bound to a device."""

    kind: str  # "tcp" | "tls"
    host: str
    port: int
    device: str | None = None
    cert: str | None = None
    key: str | None = None

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterAuth:
    """How a broker authenticates to NATS and protects the link (``--cluster-*`` flags).

    Secrets are read from files, never taken from argv (``ps`` shows argv); a
    URL's ``user:password@`` or ``token@`` works too and is never logged.
    """

    user: str | None = None
    password_file: str | None = None
    token_file: str | None = None
    nkey_file: str | None = None  # an NKey seed (SU...)
    creds_file: str | None = None  # a JWT + NKey credentials file
    tls_ca: str | None = None  # verify the NATS server against this CA (else the system's)
    tls_cert: str | None = None  # client certificate, for a server that verifies clients
    tls_key: str | None = None
    key_file: str | None = None  # the cluster key every broker signs its messages with

    def wants_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The operator console (``--admin``): address, token file, optional TLS."""

    host: str
    port: int
    tokens: str
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    name: str = "hpfeeds"
    endpoints: tuple[Endpoint, ...] = (Endpoint("tcp", "0.0.0.0", 10000),)
    auth: tuple[str, ...] = ("sqlite",)
    exporter: tuple[str, int] | None = None
    limits: Limits = field(default_factory=Limits)
    auth_limits: AuthLimits = field(default_factory=AuthLimits)
    debug: bool = False
    log_format: str = "text"
    # NATS servers of the cluster backplane (--cluster); empty: a single broker.
    cluster: tuple[str, ...] = ()
    cluster_auth: ClusterAuth = field(default_factory=ClusterAuth)
    # Several processes share the listening port (--workers): SO_REUSEPORT.
    reuse_port: bool = False
    # The operator console (--admin); None: off.
    admin: AdminConfig | None = None
    # The broker's own state on disk (--data-dir): durable channel logs and
    # positions, the console's activity history. Relative to the working
    # directory, beside the default ./sqlite.db.
    data_dir: str = "hpfeeds-data"
    # Durable keys get a durable log under data_dir (the command line turns it
    # on; off under --workers: each worker would keep its own, and the kernel
    # spreads a collector's reconnects over the workers, so it could not resume
    # where it left). Off, a durable key is served like any other.
    durable: bool = False

    def durable_config(self) -> DurableConfig:
        from .durable.config import DurableConfig

        limits = self.limits
        return DurableConfig(
            data_dir=self.data_dir,
            max_bytes=limits.durable_max_bytes,
            max_age_s=limits.durable_max_age_s,
            sync_interval_s=limits.durable_sync_s,
            overlap_bytes=limits.durable_overlap_bytes,
            # a segment is the unit of dropping: an eighth of a key's bound, 4 KiB to 16 MiB
            segment_bytes=min(limits.durable_max_bytes, max(4096, min(16 * MiB, limits.durable_max_bytes // 8))),
        )


def parse_host_port(value: str, what: str = "--bind") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not m:
        raise UsageError(f"{what}: expected HOST:PORT or [IPv6]:PORT, got {value!r}")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "0.0.0.0")
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise UsageError(f"{what}: port {port} is out of range")
    return host, port


def parse_endpoint(value: str, default_host: str = "0.0.0.0") -> Endpoint:
    """A twisted-style endpoint string, as the reference broker accepts it:

    ``tcp:port=10000:interface=0.0.0.0[:device=eth0]``
    ``tls:port=10001:cert=broker.crt:key=broker.key`` (``privateKey=`` also accepted)

    Without ``interface=`` it listens on ``default_host`` (the CLI passes the
    ``--bind`` host, so ``--bind 127.0.0.1:10000 -e tls:port=10001:...`` stays
    on loopback).
    """
    tokens = re.split(r"(?<!\\):", value)
    kind, params = tokens[0], {}
    if kind not in ("tcp", "tls"):
        raise UsageError(f"--endpoint {value!r}: kind must be 'tcp' or 'tls'")
    for token in tokens[1:]:
        if "=" not in token:
            raise UsageError(f"--endpoint {value!r}: expected key=value, got {token!r}")
        k, v = token.split("=", 1)
        params[k] = v.replace("\\:", ":")
    unknown = set(params) - {"port", "interface", "device", "cert", "key", "privateKey"}
    if unknown:
        raise UsageError(f"--endpoint {value!r}: unknown option(s) {', '.join(sorted(unknown))}")
    if "port" not in params or not params["port"].isdigit():
        raise UsageError(f"--endpoint {value!r}: port=N is required")
    key = params.get("key") or params.get("privateKey")
    cert = params.get("cert")
    if kind == "tls" and not (cert and key):
        raise UsageError(f"--endpoint {value!r}: tls needs cert=PATH and key=PATH")
    return Endpoint(
        kind=kind,
        host=params.get("interface", default_host),
        port=int(params["port"]),
        device=params.get("device"),
        cert=cert,
        key=key,
    )


def limit_fields() -> tuple[Any, ...]:
    """The ``dataclasses.Field`` of every limit, in declaration order (``metadata``: flag, help, ...)."""
    return fields(Limits)
