"""Composition root: listeners, TLS, authenticator, backplane, exporter, bounded shutdown.

The shared state every connection reaches is ``state.Broker``; this module
only builds the pieces, wires them together and runs them.

``serve(config, sockets=..., stop=...)`` is what the CLI and the tests call:
the edge (CLI) owns signals and the clock; tests pass pre-bound sockets and a
``stop`` event and use sub-second limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import resource
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Sequence

from . import metrics
from .auth import Authenticator, ChangeFeed, build_authenticator
from .config import BrokerConfig, ConfigError, Endpoint
from .connection import Connection
from .fdtable import presize_fd_table
from .state import Broker
from .tuning import GC_THRESHOLDS, LISTEN_BACKLOG, LISTENERS_PER_ENDPOINT, RESERVED_FDS

log = logging.getLogger("hpfeeds3.broker")

# --- listeners and TLS -------------------------------------------------------------------


# TLS 1.2 suites: ephemeral ECDH key exchange only (forward secret, and far
# cheaper than finite-field DHE), AEAD ciphers, for ECDSA and RSA certificates.
# AES-GCM first (hardware AES on servers), ChaCha20 for clients without it.
# TLS 1.3 suites are all AEAD with ECDHE or X25519 already and are not set here.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# TLS 1.3 session tickets sent per full handshake: a sensor reconnects with one.
TLS_TICKETS = 1


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The cheapest safe server handshake: TLS 1.2 or 1.3, ECDHE (X25519 or P-256
    first, OpenSSL's default group order), and session resumption (TLS 1.3
    tickets, TLS 1.2 tickets and session cache) so a reconnecting sensor skips
    the certificate signature and key exchange of a full handshake. An ECDSA
    P-256 certificate makes the full handshake itself much cheaper than
    RSA-2048 (docs/operations.md)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.num_tickets = TLS_TICKETS
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS certificate {cert!r} / key {key!r}: {_swapped(cert, key) or e}") from e
    return ctx


def _swapped(cert: str, key: str) -> str | None:
    """Why loading failed when the two files were given the wrong way round (OpenSSL says only "PEM lib")."""
    try:
        with open(cert, "rb") as c, open(key, "rb") as k:
            cert_text, key_text = c.read(1 << 16), k.read(1 << 16)
    except OSError:
        return None
    if b"PRIVATE KEY-----" in cert_text and b"CERTIFICATE-----" in key_text:
        return "swapped: the certificate file holds a private key and the key file a certificate"
    return None


def _reload_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """Load a new certificate and key into the serving context only once they pair.

    ``load_cert_chain`` on a mismatched pair raises after it has replaced the
    certificate, leaving a context that fails every handshake. So the files are
    copied once (owner-only, in a private directory), the copies are loaded into
    a throwaway context first, and the serving context loads the same copies."""
    with tempfile.TemporaryDirectory(prefix="hpfeeds-tls-") as tmp:
        copies = []
        for source, name in ((cert, "cert.pem"), (key, "key.pem")):
            with open(source, "rb") as f:
                data = f.read()
            copy = os.path.join(tmp, name)
            with os.fdopen(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
            copies.append(copy)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*copies)
        ctx.load_cert_chain(*copies)


async def _watch_tls(ctx: ssl.SSLContext, cert: str, key: str, stop: asyncio.Event) -> None:
    """Reload certificate and key when their files change; live connections keep theirs."""
    from watchfiles import awatch

    paths = {os.path.abspath(cert), os.path.abspath(key)}
    dirs = {os.path.dirname(p) for p in paths}
    try:
        async for _ in awatch(*dirs, stop_event=stop, debounce=300, step=50, watch_filter=lambda _c, p: p in paths):
            try:
                _reload_pair(ctx, cert, key)
                log.info("reloaded TLS certificate %s", cert)
            except (OSError, ssl.SSLError) as e:
                # Cert and key are often replaced one after the other: the pair
                # may not match for a moment. Keep the old one and wait.
                log.warning("keeping the previous TLS certificate: cannot load %s / %s: %s", cert, key, e)
    except Exception:
        log.exception("watching TLS files failed; certificate changes need a restart")


def bind_sockets(endpoint: Endpoint, *, reuse_port: bool = False) -> list[socket.socket]:
    """``LISTENERS_PER_ENDPOINT`` listening sockets on ``endpoint``'s one port, in one
    SO_REUSEPORT group (tuning.py says why). Without ``reuse_port`` (the workers'
    shared port), the port is first bound alone, so that a port another process
    listens on is refused as "address already in use" rather than shared."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    port = endpoint.port
    if not reuse_port:
        probe = _bind(endpoint, family, port, reuse_port=False)
        port = probe.getsockname()[1]  # the one an ephemeral port (0) got
        probe.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(LISTENERS_PER_ENDPOINT):
            sock = _bind(endpoint, family, port, reuse_port=True)
            socks.append(sock)
            port = sock.getsockname()[1]
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind(endpoint: Endpoint, family: socket.AddressFamily, port: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if endpoint.device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, endpoint.device.encode()[:15] + b"\0")
        # Accepted sockets inherit these from the listener (Linux): no per-connection syscalls.
        set_keepalive(sock)
        sock.bind((endpoint.host, port))
    except OSError as e:
        sock.close()
        why = "address already in use" if e.errno == 98 else e.strerror or str(e)
        raise ConfigError(f"cannot listen on {endpoint.describe()}: {why}") from e
    return sock


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive: a peer that vanished (no FIN, no RST) is noticed within about 2 minutes."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


def raise_nofile_limit(max_connections: int, reserved: int = 0) -> int:
    """Raise the soft open-files limit to the hard one; return the effective connection cap
    (``reserved`` more descriptors kept out of it: the HTTP listeners' caps)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(1, min(max_connections, soft - RESERVED_FDS - reserved))


async def serve(
    config: BrokerConfig,
    *,
    sockets: Sequence[tuple[Endpoint, socket.socket]] | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[Broker], None] | None = None,
    authenticator: Authenticator | None = None,
) -> None:
    """Run a broker until ``stop`` is set; then shut down within the drain time."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    auth = authenticator or build_authenticator(config.auth, poll_s=config.limits.revocation_poll_s)
    await auth.start()
    broker = Broker(config, auth, loop)
    from .exporter import http_reserved_fds

    http_fds = http_reserved_fds(config.exporter is not None, config.admin is not None)
    broker.max_connections = raise_nofile_limit(config.limits.max_connections, http_fds)
    presize_fd_table(broker.max_connections + RESERVED_FDS + http_fds)
    cleanups: list[Callable[[], Awaitable[None] | None]] = [auth.close]

    from .. import __version__

    metrics.BUILD_INFO.labels(__version__).set(1)
    cleanups.append(metrics.register_broker(broker))  # type: ignore[arg-type]
    watch_stop = asyncio.Event()

    servers: list[asyncio.base_events.Server] = []
    served = False
    try:
        if config.durable:
            # Recovery reads the last segment of each channel: off the loop.
            from .durable import SegmentLog

            try:
                durable = await asyncio.to_thread(SegmentLog.open, config.durable_config())
            except ConfigError as e:
                # Another broker holds the directory, or it cannot be written: serve
                # everything else, and say durable keys lose what they miss.
                log.warning("%s: durable keys are served live only; give this broker its own --data-dir", e)
            else:
                broker.attach_durable(durable)
                cleanups.append(lambda: asyncio.to_thread(durable.close))
        bound = (
            list(sockets)
            if sockets is not None
            else [(ep, sock) for ep in config.endpoints for sock in bind_sockets(ep, reuse_port=config.reuse_port)]
        )
        contexts: dict[int, ssl.SSLContext | None] = {}  # by id(endpoint): its listeners share one
        for endpoint, sock in bound:
            first = id(endpoint) not in contexts
            if first:
                ctx = None
                if endpoint.kind == "tls":
                    assert endpoint.cert and endpoint.key
                    ctx = make_tls_context(endpoint.cert, endpoint.key)
                    broker.spawn(_watch_tls(ctx, endpoint.cert, endpoint.key, watch_stop))
                contexts[id(endpoint)] = ctx
            ctx = contexts[id(endpoint)]
            # TLS listeners accept plain TCP: the connection runs the handshake
            # itself, so it counts against the limits from accept.
            server = await loop.create_server(
                functools.partial(Connection, broker, ctx),  # (a lambda is one more Python call per accept)
                sock=sock,
                backlog=LISTEN_BACKLOG,
            )
            servers.append(server)
            if first:
                host, port = sock.getsockname()[:2]
                log.info("listening on %s://%s:%s", endpoint.kind, f"[{host}]" if ":" in host else host, port)

        if config.cluster:
            from .backplane.nats import NatsBackplane

            backplane = NatsBackplane(
                config.cluster,
                broker.router.deliver_local,
                limits=broker.frame_limits,
                name=config.name,
                outbox_bytes=config.limits.cluster_outbox_bytes,
                auth=config.cluster_auth,
            )
            broker.attach_backplane(backplane)
            await backplane.start()
            cleanups.append(backplane.close)

        if config.exporter is not None:
            from .exporter import start_exporter

            cleanups.append(await start_exporter(config.exporter[0], config.exporter[1], broker.health))
            log.info("metrics on http://%s:%s/metrics", *config.exporter)

        if config.admin is not None:
            from .admin import start_admin

            cleanups.append(await start_admin(broker, config.admin))

        broker.spawn(_watch_auth_changes(broker, auth))
        # Said once the broker is sure to serve: a start that fails says one line.
        if broker.durable is not None:
            log.info("durable log in %s", os.path.join(config.data_dir, "durable"))
        elif config.reuse_port:
            log.info("durable log off with --workers: durable keys are served live only (docs/durable.md)")
        log.info(
            "hpfeeds3 %s: broker %r serving; auth %r; at most %d connections",
            __version__,
            config.name,
            auth,
            broker.max_connections,
        )
        broker.state = "serving"
        served = True
        # Everything allocated so far lives as long as the process: keep it out
        # of the cyclic GC's generations so full collections stay short.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        if started is not None:
            started(broker)
        await stop.wait()
        log.info("shutting down: draining for at most %g s", config.limits.shutdown_drain_s)
    finally:
        broker.state = "stopping"
        watch_stop.set()
        for server in servers:
            server.close()
        await broker.drain_and_close(config.limits.shutdown_drain_s)
        for cleanup in reversed(cleanups):
            result = cleanup()
            if result is not None:
                with contextlib.suppress(Exception):
                    await result
        if served:  # a start that failed says why on its own; it never served
            log.info("broker stopped")


async def _watch_auth_changes(broker: Broker, auth: Authenticator) -> None:
    """Feed the store's change notifications into ``Broker.recheck`` (revocation).

    A store that can tell is a ``ChangeFeed``: ``changes()`` yields changed
    idents (``None``: anything may have changed)."""
    if not isinstance(auth, ChangeFeed):
        return
    async for idents in auth.changes():
        await broker.recheck(idents)
