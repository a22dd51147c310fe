"""The operator console: a JSON API and a web page on their own listener (``--admin HOST:PORT``).

``start_admin(broker, config)`` binds the listener, registers the tracker as
an observer of the broker's events and starts the counter poll; it returns the async stop
function. See docs/console.md for the API, the token file and the roles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..config import AdminConfig, ConfigError

if TYPE_CHECKING:
    from ..state import Broker
    from .api import Console

# The console's modules are imported when it starts, not with the package:
# `python -m hpfeeds3.broker.admin.tokens` runs the tokens module, which must
# not be imported first (runpy warns of "unpredictable behaviour" if it is).

log = logging.getLogger("hpfeeds3.broker.admin")

# Grace given to in-flight requests when the console stops.
SHUTDOWN_TIMEOUT_S = 2.0


async def _poll(console: Console) -> None:
    from .tracker import POLL_S

    while True:
        try:
            await console.follow_keys()
            await console.tracker.poll()
            console.watches.expire()
            await console.tracker.flush()
        except Exception:  # a bug here must not end the poll
            log.exception("console poll failed")
        await asyncio.sleep(POLL_S)


async def start_admin(broker: Broker, config: AdminConfig) -> Callable[[], Awaitable[None]]:
    """Serve the console on ``config``'s address; ``ConfigError`` if it cannot."""
    from ..exporter import CONSOLE_MAX_CONNECTIONS, make_runner, start_site
    from .api import Console
    from .tokens import TokenFile

    tokens = TokenFile(config.tokens)
    ssl_ctx = None
    if config.cert and config.key:
        from ..server import make_tls_context

        ssl_ctx = make_tls_context(config.cert, config.key)
    from .activity import ActivityStore

    store = ActivityStore(broker.config.data_dir)
    console = Console(broker, tokens, secure_cookie=ssl_ctx is not None, store=store)
    try:
        await console.tracker.load()
    except Exception as e:  # an unreadable history must not keep the broker down
        log.error("console activity history %s: %s; keeping it in memory only", store.path, e)
        console.tracker.store = None
        store.close()
    broker.observe(console.tracker.observe)
    broker.refusal_observers.append(console.tracker.refused)

    runner = make_runner(console.app(), SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    host, port = config.host, config.port
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        await start_site(runner, "console", host, port, max_connections=CONSOLE_MAX_CONNECTIONS, ssl_context=ssl_ctx)
    except OSError as exc:
        await runner.cleanup()
        broker.unobserve(console.tracker.observe)
        broker.refusal_observers.remove(console.tracker.refused)
        await console.tracker.close()
        raise ConfigError(f"--admin {shown}: cannot listen: {exc.strerror or exc}") from None
    poll = asyncio.get_running_loop().create_task(_poll(console))
    log.info("console on %s://%s/", "https" if ssl_ctx else "http", shown)

    async def stop() -> None:
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll
        console.watches.stop_all()
        broker.unobserve(console.tracker.observe)
        broker.refusal_observers.remove(console.tracker.refused)
        try:
            await console.tracker.close()
        except Exception:
            log.exception("console activity history: the last write failed")
        await console.keys.close()
        await runner.cleanup()

    return stop
