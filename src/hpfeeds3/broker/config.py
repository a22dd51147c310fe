"""Broker configuration: one frozen object, built from flags, passed down.

Every limit is named here with its unit and a sentence; PROTOCOL.md's
"Limits" table is the source of the defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..protocol import HEADER_LEN, FrameLimits, MiB
from .ratelimit import AuthLimits


class ConfigError(Exception):
    """The operator's configuration is wrong: refuse to start with one clear line (exit 1)."""


class UsageError(ConfigError):
    """A flag's value is malformed, whatever the machine: exit 2, as argparse's own errors."""


@dataclass(frozen=True, slots=True)
class Limits:
    # Largest PUBLISH body (ident + channel + payload): the reference's 1 MiB,
    # since reference clients reject bigger frames.
    max_message_bytes: int = 1 * MiB
    # Accept → AUTH verified; a silent client is closed after this.
    auth_timeout_s: float = 5.0
    # TLS handshake must finish within this (asyncio's 60 s default is too long).
    tls_handshake_timeout_s: float = 10.0
    # Concurrent connections; also kept below the open-files limit at start.
    max_connections: int = 10_000
    # Connections that have not authenticated yet (a TLS handshake in progress
    # included); bounds pre-auth memory. At the bound the oldest is closed.
    max_unauthenticated: int = 1_024
    # ... of them from one address (IPv6: one /64): one host never takes the
    # whole pool. At the bound that address's oldest is closed.
    max_unauthenticated_per_address: int = 64
    # A frame whose header has arrived must arrive at least this fast (bytes
    # per second, after a few seconds' grace), or the connection is closed
    # (slow_producer): a trickled frame cannot pin its buffer for ever.
    min_receive_rate_bytes: int = 16 * 1024
    # Bytes held in incomplete frames over all connections; past it the
    # connections holding the most are closed (slow_producer).
    max_partial_frames_bytes: int = 128 * MiB
    # Subscriber outgoing buffer: cut at once above the hard bound ...
    send_buffer_hard_bytes: int = 32 * MiB
    # ... or when above the soft bound for longer than the soft window ...
    send_buffer_soft_bytes: int = 8 * MiB
    send_buffer_soft_window_s: float = 60.0
    # ... or when nothing at all has drained for this long while bytes are queued.
    send_stall_timeout_s: float = 10.0
    # Channels one connection may subscribe to.
    max_subscriptions: int = 1_024
    # Denied PUBLISH/SUBSCRIBE (or spoofed ident) answered with ERROR before we close.
    max_denials: int = 100
    # How often a polled key store (sqlite) is checked for changes that revoke
    # live sessions; JSON files are watched and PostgreSQL notifies at once.
    revocation_poll_s: float = 1.0
    # SIGTERM/SIGINT: time given to flush queued output before closing.
    shutdown_drain_s: float = 10.0
    # Bytes of local messages queued for other nodes while NATS is slow to
    # take them (--cluster); past it they are not queued but counted as
    # unforwarded, and the receivers count the gap as lost.
    cluster_outbox_bytes: int = 64 * MiB

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
