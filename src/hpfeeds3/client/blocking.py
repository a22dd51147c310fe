"""A blocking hpfeeds client for scripts, on top of the asyncio ``Client``.

It runs an event loop in one private daemon thread and forwards every call to
it, so it has exactly the asyncio client's behaviour (reconnect, re-subscribe,
the bounded pending queue, errors) and every method may be called from any
thread: calls are serialised on the loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from .aio import DEFAULT_CLOSE_TIMEOUT_S, DEFAULT_READY_GRACE_S, Client, Text
from .errors import BrokerError, ClientClosed
from .message import Message

log = logging.getLogger("hpfeeds3.client")

T = TypeVar("T")

#: Returned by the loop thread when iteration ends (``StopAsyncIteration`` may
#: not cross a coroutine boundary).
_END: Any = object()


class BlockingClient:
    """A thread-safe, blocking hpfeeds client.

    Example::

        with BlockingClient("127.0.0.1", 10000, "sensor", "s3cret") as client:
            client.publish("cowrie.sessions", b'{"src_ip": "192.0.2.1"}')
            client.flush()
            client.wait_ready()      # raises AccessDenied if the channel was refused

        with BlockingClient("127.0.0.1", 10000, "collector", "s3cret") as client:
            client.subscribe("cowrie.sessions")
            for message in client:          # or: client.run(callback)
                print(message.channel, message.ident, message.payload)

    Takes the same arguments as ``hpfeeds3.client.Client`` (``tls``, ``cafile``,
    ``reconnect``, ``backoff``, ``max_pending``, ``on_error``, ...) and gives the
    same guarantees; see its docstrings. ``on_error`` is called on the
    client's I/O thread and must not call this client's methods (they would
    wait on that very thread; they raise ``RuntimeError`` instead). Entering
    the ``with`` block connects; leaving closes. ``close`` may be called from
    any other thread, also while another thread iterates or ``run``s.
    """

    def __init__(self, host: str, port: int, ident: Text, secret: Text, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hpfeeds-client", daemon=True)
        self._thread.start()
        self._closed = False
        self._close_lock = threading.Lock()  # one close at a time
        self._submit_lock = threading.Lock()  # no submission races the loop's shutdown
        self._waiting: set[concurrent.futures.Future[Any]] = set()
        try:
            self._client: Client = self._call(_construct(host, port, ident, secret, options))
        except BaseException:
            self._stop_loop()
            raise

    @property
    def client(self) -> Client:
        """The underlying asyncio client (use it only from its loop's thread)."""
        return self._client

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def pending(self) -> int:
        return self._client.pending

    @property
    def broker_name(self) -> str:
        return self._client.broker_name

    def connect(self, *, retry: bool = False, timeout_s: float | None = None) -> None:
        """Connect and authenticate (``Client.connect``)."""
        self._call(self._client.connect(retry=retry), timeout_s)

    def subscribe(self, *channels: Text) -> None:
        self._call(self._client.subscribe(*channels))

    def unsubscribe(self, *channels: Text) -> None:
        self._call(self._client.unsubscribe(*channels))

    def publish(self, channel: Text, payload: Text, timeout_s: float | None = None) -> None:
        """Publish; thread-safe; same guarantee as ``Client.publish``
        (``PublishQueueFull`` while disconnected with a full queue)."""
        self._call(self._client.publish(channel, payload), timeout_s)

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every publish so far was written to the socket (``Client.flush``)."""
        self._call(self._client.flush(timeout_s))

    def wait_ready(self, grace_s: float = DEFAULT_READY_GRACE_S) -> None:
        """Block until connected, then up to ``grace_s`` for a refusal (``Client.wait_ready``)."""
        self._call(self._client.wait_ready(grace_s))

    def finish(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Flush, hear the broker's last word (raising its ERROR), close (``Client.finish``)."""
        try:
            self._call(self._client.finish(timeout_s))
        finally:
            self.close(timeout_s)

    def get(self, timeout_s: float | None = None) -> Message | None:
        """The next message, or ``None`` after ``timeout_s`` or once closed.

        Raises unread ``BrokerError``s and the fatal error like iteration does.
        """
        try:
            result = self._call(_next(self._client), timeout_s)
        except (TimeoutError, ClientClosed):
            return None
        return None if result is _END else result

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        try:
            result = self._call(_next(self._client))
        except ClientClosed:
            raise StopIteration from None
        if result is _END:
            raise StopIteration
        return result  # type: ignore[no-any-return]

    def run(
        self,
        on_message: Callable[[Message], object],
        on_error: Callable[[BrokerError], object] | None = None,
    ) -> None:
        """Call ``on_message`` for every message until the client is closed (from
        another thread or from a callback) or fails for good.

        Non-fatal ``BrokerError``s go to ``on_error`` (default: logged); the
        fatal error is raised.
        """
        while not self._closed:
            try:
                batch = self._call(_batch(self._client))
            except ClientClosed:
                return
            except BrokerError as err:
                if err is self._client._fatal:
                    raise
                if on_error is None:
                    log.warning("broker error: %s", err)
                else:
                    on_error(err)
                continue
            if batch is _END:
                return
            for message in batch:
                on_message(message)

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> int:
        """Close the connection and stop the I/O thread; returns the number of
        queued publishes discarded (see ``Client.close``). Idempotent."""
        with self._close_lock:
            if self._closed:
                return 0
            try:
                discarded: int = self._call(self._client.close(timeout_s))
            finally:
                self._stop_loop()
            return discarded

    def __enter__(self) -> BlockingClient:
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            # Waiting on the loop from its own thread would never return.
            raise RuntimeError("BlockingClient methods cannot be called from its on_error callback")
        with self._submit_lock:
            if self._closed:
                coro.close()
                raise ClientClosed("the client was closed")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._waiting.add(future)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout_s} s") from None
        except concurrent.futures.CancelledError:
            if self._closed:  # cancelled by _stop_loop: another thread closed the client
                raise ClientClosed("the client was closed") from None
            raise
        finally:
            with self._submit_lock:
                self._waiting.discard(future)

    def _stop_loop(self) -> None:
        with self._submit_lock:
            self._closed = True
        # Cancel what other threads still wait for (they get ClientClosed), then stop.
        asyncio.run_coroutine_threadsafe(_shutdown(), self._loop)
        self._thread.join(timeout=DEFAULT_CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        # Nothing may wait forever on a loop that is gone.
        with self._submit_lock:
            waiting, self._waiting = self._waiting, set()
        for future in waiting:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(ClientClosed("the client was closed"))


async def _shutdown() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # A task that finished in this very loop iteration hands its result to the
    # waiting thread in a callback of the next one; stop() would skip it.
    for _ in range(3):
        await asyncio.sleep(0)
    asyncio.get_running_loop().stop()


async def _construct(host: str, port: int, ident: Text, secret: Text, options: dict[str, Any]) -> Client:
    return Client(host, port, ident, secret, **options)


async def _next(client: Client) -> Any:
    try:
        return await client.__anext__()
    except StopAsyncIteration:
        return _END


async def _batch(client: Client) -> Any:
    try:
        return await client.messages()
    except StopAsyncIteration:
        return _END
