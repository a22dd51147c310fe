"""``hpfeeds-broker``: argv → BrokerConfig → serve().

Flags of the spec and of the reference broker keep their meaning; every limit
of PROTOCOL.md has a flag. ``hpfeeds-broker keys ...`` manages access keys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from ..protocol import MiB
from .config import (
    AdminConfig,
    AuthLimits,
    BrokerConfig,
    ConfigError,
    Endpoint,
    Limits,
    parse_endpoint,
    parse_host_port,
)

log = logging.getLogger("hpfeeds3.broker")

_DEFAULTS = Limits()
_AUTH_DEFAULTS = AuthLimits()

EPILOG = """\
auth backends (--auth, repeatable; the first that knows an ident wins):
  sqlite              ./sqlite.db, the reference broker's authkeys table (default)
  sqlite:PATH         another sqlite file
  env                 HPFEEDS_<IDENT>_SECRET, _PUBCHANS, _SUBCHANS, _OWNER
  PATH.json           {"ident": {"owner", "secret", "pubchans", "subchans"}}, reloaded on change
  postgresql://...    a shared PostgreSQL store

manage access keys without SQL:  hpfeeds-broker keys --help

exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when the broker
cannot start (port in use, unreadable certificate, unusable auth store),
2 for bad flags.
"""


# Every limit of PROTOCOL.md has a flag: flag, Limits field, help. The unit
# (and so the parser and metavar) comes from the field's suffix: _bytes, _s, or
# a plain count.
LIMIT_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--max-message-size", "max_message_bytes", "largest PUBLISH body: ident + channel + payload (default 1M)"),
    ("--auth-timeout", "auth_timeout_s", "accept -> AUTH verified (default %(default)s)"),
    ("--tls-handshake-timeout", "tls_handshake_timeout_s", "TLS handshake deadline (default %(default)s)"),
    (
        "--max-connections",
        "max_connections",
        "concurrent connections, also kept below the open-files limit (default %(default)s)",
    ),
    (
        "--max-unauthenticated",
        "max_unauthenticated",
        "connections that have not authenticated yet (default %(default)s)",
    ),
    (
        "--send-buffer-hard",
        "send_buffer_hard_bytes",
        "cut a subscriber at once above this many queued bytes (default 32M)",
    ),
    (
        "--send-buffer-soft",
        "send_buffer_soft_bytes",
        "cut a subscriber above this many queued bytes for --send-buffer-soft-window (default 8M)",
    ),
    ("--send-buffer-soft-window", "send_buffer_soft_window_s", "(default %(default)s)"),
    (
        "--send-stall-timeout",
        "send_stall_timeout_s",
        "cut a subscriber when nothing drained for this long while bytes are queued (default %(default)s)",
    ),
    ("--max-subscriptions", "max_subscriptions", "channels per connection (default %(default)s)"),
    (
        "--max-denials",
        "max_denials",
        "refused frames answered with ERROR before the connection is closed (default %(default)s)",
    ),
    (
        "--revocation-poll",
        "revocation_poll_s",
        "how often the sqlite store is checked for removed keys, rotated secrets and revoked channels, "
        "which then reach live sessions (default %(default)s; JSON files and PostgreSQL notify at once)",
    ),
    ("--shutdown-drain", "shutdown_drain_s", "on SIGTERM/SIGINT, time to flush queued output (default %(default)s)"),
)

# flag, AuthLimits field, help (per_* fields are counts where 0 disables the limit).
AUTH_LIMIT_FLAGS: tuple[tuple[str, str, str], ...] = (
    (
        "--auth-fail-limit",
        "per_ident",
        "failed AUTHs per source address and ident within the window (default %(default)s)",
    ),
    (
        "--auth-fail-address-limit",
        "per_address",
        "failed AUTHs per source address over all idents within the window (default %(default)s)",
    ),
    ("--auth-fail-window", "window_s", "(default %(default)s)"),
    (
        "--auth-fail-block",
        "block_s",
        "how long an address (or address and ident) over a limit is refused (default %(default)s)",
    ),
)


def _limit_type(field: str) -> tuple[Callable[[str], float], str]:
    if field.endswith("_bytes"):
        return _size, "BYTES"
    if field == "shutdown_drain_s":
        return _non_negative, "SECONDS"
    if field.endswith("_s"):
        return _positive(float), "SECONDS"
    return _positive(int), "N"


def _count(value: str) -> int:
    """A whole number, 0 or more (0 disables the limit)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return n


def _non_negative(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return n


def _size(value: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    v = value.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": MiB, "G": 1024 * MiB}.get(v[-1:], 1)
    try:
        n = int(float(v[:-1] if mult != 1 else v) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 1048576, 512K, 8M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {value!r}")
    return n


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def convert(value: str) -> float:
        try:
            n = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
        return n

    return convert


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="hpfeeds-broker",
        description="Run an hpfeeds broker.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"hpfeeds-broker {__version__}")
    p.add_argument(
        "--bind",
        metavar="HOST:PORT",
        help="listen address (default 0.0.0.0:10000; [::]:PORT for IPv6); TLS when --tlscert/--tlskey are given",
    )
    p.add_argument("--name", default="hpfeeds", help="broker name sent to clients in INFO (default: hpfeeds)")
    p.add_argument("--auth", action="append", metavar="SPEC", help="auth backend, repeatable (default: sqlite)")
    p.add_argument("--tlscert", metavar="PATH", help="TLS certificate (PEM) for --bind; reloaded when it changes")
    p.add_argument("--tlskey", metavar="PATH", help="TLS private key (PEM) for --bind")
    p.add_argument(
        "-e",
        "--endpoint",
        action="append",
        metavar="SPEC",
        help="extra listener, repeatable: tcp:port=N[:interface=IP][:device=DEV] or "
        "tls:port=N:cert=PATH:key=PATH[:interface=IP][:device=DEV]",
    )
    p.add_argument("--exporter", metavar="HOST:PORT", help="serve Prometheus /metrics and /healthz here")
    p.add_argument(
        "--admin", metavar="HOST:PORT", help="serve the operator console (web page and /api/v1/) here; off by default"
    )
    p.add_argument(
        "--admin-tokens", metavar="FILE", help="console access tokens: NAME ROLE sha256:HEX per line (docs/console.md)"
    )
    p.add_argument("--admin-tlscert", metavar="PATH", help="TLS certificate (PEM) for --admin")
    p.add_argument("--admin-tlskey", metavar="PATH", help="TLS private key (PEM) for --admin")
    p.add_argument(
        "--cluster",
        metavar="URLS",
        help="join a cluster over NATS: nats://HOST:4222[,nats://...]; several brokers behave as one",
    )
    p.add_argument(
        "--workers",
        type=_positive(int),
        default=1,
        metavar="N",
        help="run N broker processes sharing the listening port (needs --cluster); "
        "with --exporter HOST:PORT, worker i serves metrics on PORT+i",
    )
    # Set by the --workers supervisor on its workers.
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="log frame-level detail")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format (default: text)")

    g = p.add_argument_group("limits")
    for flag, field, text in LIMIT_FLAGS:
        convert, metavar = _limit_type(field)
        g.add_argument(flag, dest=field, type=convert, default=getattr(_DEFAULTS, field), metavar=metavar, help=text)
    a = p.add_argument_group("failed-AUTH limits (brute force; 0 disables a limit)")
    for flag, field, text in AUTH_LIMIT_FLAGS:
        convert, metavar = (_count, "N") if field.startswith("per_") else _limit_type(field)
        a.add_argument(
            flag, dest=f"auth_{field}", type=convert, default=getattr(_AUTH_DEFAULTS, field), metavar=metavar, help=text
        )
    return p


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    if bool(args.tlscert) != bool(args.tlskey):
        raise ConfigError("--tlscert and --tlskey must be given together")
    if args.workers > 1 and not args.cluster:
        raise ConfigError("--workers needs --cluster: the workers exchange messages over NATS")
    endpoints: list[Endpoint] = []
    if args.bind or not args.endpoint:
        host, port = parse_host_port(args.bind or "0.0.0.0:10000")
        if args.tlscert:
            endpoints.append(Endpoint("tls", host, port, cert=args.tlscert, key=args.tlskey))
        else:
            endpoints.append(Endpoint("tcp", host, port))
    for spec in args.endpoint or ():
        endpoints.append(parse_endpoint(spec))
    for ep in endpoints:
        for path in (ep.cert, ep.key):
            if path is not None:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as e:
                    raise ConfigError(f"cannot read TLS file {path!r}: {e.strerror}") from e
    limits = Limits(**{field: getattr(args, field) for _, field, _ in LIMIT_FLAGS})
    admin = _admin_config(args)
    return BrokerConfig(
        name=args.name,
        endpoints=tuple(endpoints),
        auth=tuple(args.auth or ("sqlite",)),
        exporter=parse_host_port(args.exporter, "--exporter") if args.exporter else None,
        limits=limits,
        auth_limits=AuthLimits(**{field: getattr(args, f"auth_{field}") for _, field, _ in AUTH_LIMIT_FLAGS}),
        debug=args.debug,
        log_format=args.log_format,
        cluster=tuple(u.strip() for u in (args.cluster or "").split(",") if u.strip()),
        reuse_port=args.workers > 1 or args.reuse_port,
        admin=admin,
    )


def _admin_config(args: argparse.Namespace) -> AdminConfig | None:
    if not args.admin:
        if args.admin_tokens or args.admin_tlscert or args.admin_tlskey:
            raise ConfigError("--admin-tokens and --admin-tls* need --admin HOST:PORT")
        return None
    if not args.admin_tokens:
        raise ConfigError("--admin needs --admin-tokens FILE (make a token: python -m hpfeeds3.broker.admin.tokens)")
    if bool(args.admin_tlscert) != bool(args.admin_tlskey):
        raise ConfigError("--admin-tlscert and --admin-tlskey must be given together")
    if args.workers > 1:
        raise ConfigError("--admin shows one process: it cannot be used with --workers")
    host, port = parse_host_port(args.admin, "--admin")
    return AdminConfig(host, port, args.admin_tokens, args.admin_tlscert, args.admin_tlskey)


def configure_logging(fmt: str, debug: bool) -> None:
    try:
        from .logs import configure_logging as configure
    except ImportError:  # pragma: no cover - logs.py ships with the package
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return
    configure(fmt, debug)
    # watchfiles logs every change it sees at INFO; we log what we do about it.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


async def _run(config: BrokerConfig) -> None:
    from .server import serve

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop=stop)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keys"]:
        from .keys.cli import main as keys_main

        return keys_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"hpfeeds-broker: error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.debug)
    if args.workers > 1:
        from .supervisor import Supervisor

        return Supervisor(argv, args.workers, args.exporter, config.limits.shutdown_drain_s).run()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # uvloop is in [broker]; asyncio works too, slower
        run = asyncio.run  # type: ignore[assignment]
    try:
        run(_run(config))
    except ConfigError as e:
        print(f"hpfeeds-broker: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
