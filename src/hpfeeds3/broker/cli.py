"""``hpfeeds-broker``: argv → BrokerConfig → serve().

Flags of the spec and of the reference broker keep their meaning; every limit
of PROTOCOL.md has a flag. ``hpfeeds-broker keys ...`` manages access keys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..protocol import MiB
from .auth.spec import forms_help
from .config import (
    AdminConfig,
    AuthLimits,
    BrokerConfig,
    ClusterAuth,
    ConfigError,
    Endpoint,
    Limits,
    UsageError,
    limit_fields,
    parse_endpoint,
    parse_host_port,
)

log = logging.getLogger("hpfeeds3.broker")

_DEFAULTS = Limits()
_AUTH_DEFAULTS = AuthLimits()

EPILOG = f"""\
auth backends (--auth, repeatable; the first that knows an ident wins):
{forms_help()}

manage access keys without SQL:  hpfeeds-broker keys --help

exit status:
  0  clean shutdown (SIGTERM/SIGINT)
  1  cannot start: port in use, missing or unreadable certificate or key,
     certificate and key that do not match, auth store that cannot be opened
  2  bad usage: unknown flag, malformed value (HOST:PORT, --endpoint, --auth SPEC)
"""


def _shown_default(name: str, default: Any) -> str:
    """A limit's default as --help shows it: sizes as 1M or 16K, the rest as argparse does."""
    if name.endswith("_bytes"):
        for unit, size in (("M", MiB), ("K", 1024)):
            if default % size == 0:
                return f"{default // size}{unit}"
        return str(default)
    return "%(default)s"


# Every limit has a flag: flag, Limits field, help, derived from the fields of
# config.Limits (where each limit is declared once). The unit (and so the
# parser and metavar) comes from the field's suffix: _bytes, _s, or a plain count.
LIMIT_FLAGS: tuple[tuple[str, str, str], ...] = tuple(
    (
        f.metadata["flag"],
        f.name,
        " ".join(filter(None, (f.metadata["help"], f"(default {_shown_default(f.name, f.default)})"))),
    )
    for f in limit_fields()
)
_ZERO_OK = frozenset(f.name for f in limit_fields() if f.metadata["zero_ok"])

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
    if field in _ZERO_OK:
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
        "tls:port=N:cert=PATH:key=PATH[:interface=IP][:device=DEV]; interface defaults to the --bind host",
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
    c = p.add_argument_group("cluster link (NATS authentication and TLS; a URL's user:password@ or token@ also works)")
    c.add_argument("--cluster-user", metavar="USER", help="NATS user (password in --cluster-password-file)")
    c.add_argument("--cluster-password-file", metavar="PATH", help="file holding the NATS password")
    c.add_argument("--cluster-token-file", metavar="PATH", help="file holding a NATS authentication token")
    c.add_argument("--cluster-nkey", metavar="PATH", help="file holding an NKey seed (SU...) to sign in with")
    c.add_argument("--cluster-creds", metavar="PATH", help="NATS credentials file (JWT and NKey seed)")
    c.add_argument(
        "--cluster-tls-ca",
        metavar="PATH",
        help="connect to NATS over TLS and verify the server against this CA (tls:// URLs use the system CAs)",
    )
    c.add_argument("--cluster-tls-cert", metavar="PATH", help="client certificate (PEM) for NATS over TLS")
    c.add_argument("--cluster-tls-key", metavar="PATH", help="client private key (PEM) for --cluster-tls-cert")
    c.add_argument(
        "--cluster-key-file",
        metavar="PATH",
        help="file holding the cluster key (the same on every broker, 16+ bytes): messages are signed with it and "
        "unsigned ones dropped, so a NATS client that is not a broker cannot speak as one",
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
    p.add_argument(
        "--data-dir",
        metavar="PATH",
        default="hpfeeds-data",
        help="the broker's state on disk: durable channel logs and positions, the console's activity history "
        "(default: ./hpfeeds-data)",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format (default: text)")

    g = p.add_argument_group("limits")
    for flag, field, text in LIMIT_FLAGS:
        convert, metavar = _limit_type(field)
        g.add_argument(
            flag,
            dest=field,
            type=convert,
            default=getattr(_DEFAULTS, field),
            metavar=metavar,
            help=_units(text, metavar),
        )
    a = p.add_argument_group("failed-AUTH limits (brute force; 0 disables a limit)")
    for flag, field, text in AUTH_LIMIT_FLAGS:
        convert, metavar = (_count, "N") if field.startswith("per_") else _limit_type(field)
        a.add_argument(
            flag,
            dest=f"auth_{field}",
            type=convert,
            default=getattr(_AUTH_DEFAULTS, field),
            metavar=metavar,
            help=_units(text, metavar),
        )
    return p


def _units(text: str, metavar: str) -> str:
    """A duration's default with its unit: "(default 5 s)", not "(default 5.0)"."""
    return text.replace("(default %(default)s", "(default %(default)g s") if metavar == "SECONDS" else text


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    if bool(args.tlscert) != bool(args.tlskey):
        raise UsageError("--tlscert and --tlskey must be given together")
    if args.workers > 1 and not args.cluster:
        raise UsageError("--workers needs --cluster: the workers exchange messages over NATS")
    cluster_auth = _cluster_auth(args)
    endpoints: list[Endpoint] = []
    host, port = parse_host_port(args.bind or "0.0.0.0:10000")
    if args.bind or not args.endpoint:
        if args.tlscert:
            endpoints.append(Endpoint("tls", host, port, cert=args.tlscert, key=args.tlskey))
        else:
            endpoints.append(Endpoint("tcp", host, port))
    for spec in args.endpoint or ():
        endpoints.append(parse_endpoint(spec, default_host=host))
    for ep in endpoints:
        for path in (ep.cert, ep.key):
            if path is not None:
                _readable(path, "TLS file")
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
        cluster=_cluster_urls(args.cluster or ""),
        cluster_auth=cluster_auth,
        reuse_port=args.workers > 1 or args.reuse_port,
        admin=admin,
        data_dir=args.data_dir,
        durable=args.workers == 1 and not args.reuse_port,
    )


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path!r}: {e.strerror}") from e


# ClusterAuth field -> flag (user first: the only one that is not a file).
_CLUSTER_AUTH_FLAGS = (
    ("user", "--cluster-user"),
    ("password_file", "--cluster-password-file"),
    ("token_file", "--cluster-token-file"),
    ("nkey_file", "--cluster-nkey"),
    ("creds_file", "--cluster-creds"),
    ("tls_ca", "--cluster-tls-ca"),
    ("tls_cert", "--cluster-tls-cert"),
    ("tls_key", "--cluster-tls-key"),
    ("key_file", "--cluster-key-file"),
)


def _cluster_urls(text: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in text.split(",") if u.strip())
    for url in urls:  # nats-py would try to resolve "http" as a host name
        if "://" in url and url.split("://", 1)[0].lower() not in ("nats", "tls", "ws", "wss"):
            raise UsageError(f"--cluster {url!r}: a NATS URL is nats://HOST:4222 (or tls://, ws://, wss://)")
    return urls


def _cluster_auth(args: argparse.Namespace) -> ClusterAuth:
    auth = ClusterAuth(
        user=args.cluster_user,
        password_file=args.cluster_password_file,
        token_file=args.cluster_token_file,
        nkey_file=args.cluster_nkey,
        creds_file=args.cluster_creds,
        tls_ca=args.cluster_tls_ca,
        tls_cert=args.cluster_tls_cert,
        tls_key=args.cluster_tls_key,
        key_file=args.cluster_key_file,
    )
    given = [flag for field, flag in _CLUSTER_AUTH_FLAGS if getattr(auth, field)]
    if given and not args.cluster:
        raise UsageError("the --cluster-* options need --cluster")
    if bool(auth.user) != bool(auth.password_file):
        raise UsageError("--cluster-user and --cluster-password-file must be given together")
    if bool(auth.tls_cert) != bool(auth.tls_key):
        raise UsageError("--cluster-tls-cert and --cluster-tls-key must be given together")
    if sum(bool(x) for x in (auth.user, auth.token_file, auth.nkey_file, auth.creds_file)) > 1:
        raise UsageError("give one NATS sign-in: a user, a token, an NKey or a credentials file")
    for field, flag in _CLUSTER_AUTH_FLAGS[1:]:
        if getattr(auth, field):
            _readable(getattr(auth, field), flag)
    if auth.nkey_file or auth.creds_file:
        try:
            import nkeys  # noqa: F401
        except ImportError:
            raise ConfigError("--cluster-nkey and --cluster-creds need the nkeys package: pip install nkeys") from None
    return auth


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
        return _refuse(e)
    configure_logging(config.log_format, config.debug)
    if args.reuse_port:
        from .supervisor import WORKER_ENV

        if os.environ.get(WORKER_ENV, "").isdigit():
            _name_worker_in_logs(int(os.environ[WORKER_ENV]))
    try:
        return _serve(argv, args, config)
    finally:
        from .logs import stop_logging

        stop_logging()  # every queued line is written before the process exits


def _serve(argv: list[str], args: argparse.Namespace, config: BrokerConfig) -> int:
    if args.workers > 1:
        from .supervisor import Supervisor

        return Supervisor(argv, args.workers, args.exporter, config).run()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # uvloop is in [broker]; asyncio works too, slower
        run = asyncio.run  # type: ignore[assignment]
    try:
        run(_run(config))
    except ConfigError as e:
        return _refuse(e)
    except KeyboardInterrupt:
        pass
    return 0


def _name_worker_in_logs(index: int) -> None:
    """Under ``--workers``: every line a worker logs starts with "worker INDEX: "."""
    make_record = logging.getLogRecordFactory()
    prefix = f"worker {index}: "

    def record(*args: object, **kwargs: object) -> logging.LogRecord:
        rec = make_record(*args, **kwargs)
        rec.msg = prefix + str(rec.msg)
        return rec

    logging.setLogRecordFactory(record)


def _refuse(error: ConfigError) -> int:
    """One line on stderr; exit 2 for a malformed flag, 1 for what stops the start."""
    print(f"hpfeeds-broker: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
