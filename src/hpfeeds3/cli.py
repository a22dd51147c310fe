"""``hpfeeds``: publish to and subscribe from an hpfeeds broker in a shell.

Thin: argv → options → ``hpfeeds3.client.Client``. Flags of the reference
``hpfeeds`` command keep their meaning (``--host``, ``-p/--port``,
``-i/--ident``, ``-s/--secret``, ``-c/--chan``, ``--tls``, ``--tlscert``,
``--debug``, and its ``sendfile`` action). Stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .client import (
    AccessDenied,
    AuthenticationFailed,
    BrokerError,
    Client,
    ClientError,
    ConnectionLost,
    Kicked,
    Message,
    NoGreeting,
)

EXIT_OK = 0
EXIT_ERROR = 1  # anything else: an unexpected broker ERROR, an unreadable file, a message too big
EXIT_USAGE = 2  # argparse's own
EXIT_CONNECT = 3  # refused, unreachable, timed out, TLS failure, connection lost
EXIT_AUTH = 4  # the broker refused the ident/secret
EXIT_DENIED = 5  # the broker refused a channel (publish or subscribe)
EXIT_INTERRUPTED = 130  # Ctrl-C during publish (subscribe exits 0)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10000
DEFAULT_WAIT_S = 0.5
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_FINISH_S = 5.0  # publish: how long the broker may take to close after our half-close
STDIN_CHUNK_BYTES = 64 * 1024
INPUT_POLL_S = 0.2  # how often the input thread, waiting for the sender, checks that the command goes on

EPILOG = f"""\
environment:
  HPFEEDS_HOST, HPFEEDS_PORT, HPFEEDS_IDENT, HPFEEDS_SECRET
      used when --host, --port, --ident, --secret are not given (keeps the
      secret out of `ps`). Defaults: host {DEFAULT_HOST}, port {DEFAULT_PORT}.

subscribe output:
  one line per message: CHANNEL IDENT PAYLOAD. The payload is printed as text
  when it is valid UTF-8 without control characters (tab allowed) and does not
  start with "base64:"; otherwise as "base64:" followed by its base64 encoding.
  With --json: one object per line, {{"channel", "ident", "payload"}} with the
  payload as text when it is valid UTF-8, else {{"channel", "ident",
  "payload_b64"}}. The subscriber reconnects (and re-subscribes) by itself if
  the connection drops or an operator disconnects it, saying so on stderr; a
  channel refused at the start exits 5, one refused after a reconnect is
  named on stderr and the others go on. Ctrl-C exits 0.

publish:
  the payload is the arguments joined by spaces (as the reference command),
  or the content of --file (- for standard input), or with --lines one message
  per line of standard input (or of --file), over one connection. Each message
  goes to every -c channel. The command waits until everything is written and
  then --wait seconds for the broker to object (brokers acknowledge nothing).

exit status:
  {EXIT_OK}  success
  {EXIT_ERROR}  other error (an unexpected ERROR from the broker, unreadable file, message too big)
  {EXIT_USAGE}  bad usage
  {EXIT_CONNECT}  cannot connect (refused, unreachable, timeout, TLS) or connection lost (or kicked)
  {EXIT_AUTH}  authentication failed
  {EXIT_DENIED}  channel access denied
  {EXIT_INTERRUPTED}  publish interrupted by Ctrl-C
Errors are reported as one line on standard error.
"""

SUBCOMMAND_EPILOG = "environment, output format and exit status: hpfeeds --help"


@dataclass(frozen=True, slots=True)
class Options:
    host: str
    port: int
    ident: str
    secret: str
    channels: tuple[str, ...]
    tls: bool
    cafile: str | None
    server_name: str | None
    timeout_s: float
    verbose: bool


class CliError(Exception):
    """Ends the command with ``code`` and one line on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _common_options() -> argparse.ArgumentParser:
    # Accepted both before and after the action, as the reference's optparse
    # does; SUPPRESS keeps a later parser from resetting an earlier value.
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument("--host", default=s, help=f"broker host (env HPFEEDS_HOST, default {DEFAULT_HOST})")
    p.add_argument("-p", "--port", type=int, default=s, help=f"broker port (env HPFEEDS_PORT, default {DEFAULT_PORT})")
    p.add_argument("-i", "--ident", default=s, help="ident of the access key (env HPFEEDS_IDENT)")
    p.add_argument("-s", "--secret", default=s, help="secret of the access key (env HPFEEDS_SECRET)")
    p.add_argument(
        "-c",
        "--chan",
        dest="channels",
        metavar="CHANNEL",
        action="append",
        default=s,
        help="channel (repeat for several)",
    )
    p.add_argument("--tls", action="store_true", default=s, help="use TLS, trusting the system's CAs")
    p.add_argument("--tlscert", metavar="CAFILE", default=s, help="use TLS, trusting the CA certificate(s) in CAFILE")
    p.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=s,
        help="use TLS; the name the broker's certificate must hold (default: --host), "
        "e.g. when connecting by IP address to a certificate issued for a host name",
    )
    p.add_argument(
        "--timeout", type=float, default=s, metavar="SECONDS", help=f"connect timeout (default {DEFAULT_TIMEOUT_S:g} s)"
    )
    p.add_argument("-v", "--verbose", action="store_true", default=s, help="report connections on stderr")
    p.add_argument("--debug", action="store_true", default=s, help="debug logging on stderr")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hpfeeds",
        description="Publish to and subscribe from an hpfeeds broker.",
        epilog=EPILOG,
        formatter_class=formatter,
        parents=[common],
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"hpfeeds {__version__}")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{subscribe,publish,sendfile}")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, parents=[common], help=help, epilog=SUBCOMMAND_EPILOG)

    sub = action("subscribe", "print messages of the -c channels")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument("-n", "--count", type=int, default=None, metavar="N", help="exit 0 after N messages")
    sub.add_argument("-o", "--output", default=None, help="append to this file instead of standard output")

    pub = action("publish", "publish a message to the -c channels")
    pub.add_argument("payload", nargs="*", help="the message (arguments joined by spaces)")
    pub.add_argument("-f", "--file", default=None, help="publish this file's content (- for standard input)")
    pub.add_argument("--lines", action="store_true", help="one message per line of standard input (or of --file)")
    pub.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help=f"how long to listen for an ERROR after sending (default {DEFAULT_WAIT_S:g} s); on plain TCP "
        "the command then also waits for the broker to close after its last answer, so a refused "
        "login or channel is reported even with --wait 0",
    )

    send = action("sendfile", "publish a file's content (reference compatibility)")
    send.add_argument("file", help="the file to publish")
    send.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, help=argparse.SUPPRESS)
    return parser


def _options(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> Options:
    env = os.environ

    def pick(name: str, var: str) -> str | None:
        value = getattr(ns, name, None)
        return value if value is not None else env.get(var) or None

    host = pick("host", "HPFEEDS_HOST") or DEFAULT_HOST
    port_text = getattr(ns, "port", None) or env.get("HPFEEDS_PORT") or DEFAULT_PORT
    try:
        port = int(port_text)
    except ValueError:
        parser.error(f"port must be a number, not {port_text!r}")
    ident = pick("ident", "HPFEEDS_IDENT")
    secret = pick("secret", "HPFEEDS_SECRET")
    if not ident:
        parser.error("an ident is needed: -i/--ident or HPFEEDS_IDENT")
    if secret is None:
        parser.error("a secret is needed: -s/--secret or HPFEEDS_SECRET")
    if not secret:
        # Typically -s "$SECRET" in a shell that never set SECRET: sending the
        # empty secret would only earn "authentication failed".
        parser.error('the secret is empty (-s ""): is its variable set in this shell?')
    channels = tuple(getattr(ns, "channels", None) or ())
    if not channels:
        parser.error("at least one channel is needed: -c/--chan")
    cafile = getattr(ns, "tlscert", None)
    if cafile is not None and not os.path.isfile(cafile):
        parser.error(f"--tlscert {cafile!r} is not a file")
    server_name = getattr(ns, "tls_server_name", None)
    return Options(
        host=host,
        port=port,
        ident=ident,
        secret=secret,
        channels=channels,
        tls=bool(getattr(ns, "tls", False)) or cafile is not None or server_name is not None,
        cafile=cafile,
        server_name=server_name,
        timeout_s=getattr(ns, "timeout", None) or DEFAULT_TIMEOUT_S,
        verbose=bool(getattr(ns, "verbose", False)),
    )


def _client(opts: Options, *, reconnect: bool) -> Client:
    return Client(
        opts.host,
        opts.port,
        opts.ident,
        opts.secret,
        tls=opts.tls,
        cafile=opts.cafile,
        server_hostname=opts.server_name,
        reconnect=reconnect,
        connect_timeout_s=opts.timeout_s,
    )


def _say(text: str) -> None:
    print(f"hpfeeds: {text}", file=sys.stderr, flush=True)


def _failure(exc: BaseException, opts: Options) -> CliError:
    """The exit code and one-line message for an exception."""
    where = f"{opts.host}:{opts.port}"
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, AuthenticationFailed):
        return CliError(EXIT_AUTH, f"authentication failed: {exc.message}")
    if isinstance(exc, AccessDenied):
        return CliError(EXIT_DENIED, f"access denied: {exc.message}")
    if isinstance(exc, Kicked):
        return CliError(EXIT_CONNECT, f"{where}: disconnected by the broker's operator: {exc.message}")
    if isinstance(exc, BrokerError):
        return CliError(EXIT_ERROR, f"broker error: {exc.message}")
    if isinstance(exc, NoGreeting):
        silence = "closed the connection" if "without a byte" in str(exc) else f"sent nothing in {opts.timeout_s:g} s"
        return CliError(EXIT_CONNECT, f"cannot connect to {where}: the broker {silence}: is this a TLS port? try --tls")
    if isinstance(exc, ConnectionLost):
        return CliError(EXIT_CONNECT, str(exc) if where in str(exc) else f"{where}: {exc}")
    if isinstance(exc, TimeoutError):
        return CliError(EXIT_CONNECT, f"cannot connect to {where}: timed out after {opts.timeout_s:g} s")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "verify_message", "") or getattr(exc, "reason", None) or str(exc)
        if getattr(exc, "reason", None) in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            reason += ": is this a plain (non-TLS) port? try without --tls"
        return CliError(EXIT_CONNECT, f"cannot connect to {where}: TLS: {reason}")
    if isinstance(exc, socket.gaierror):
        return CliError(EXIT_CONNECT, f"cannot connect to {where}: cannot resolve {opts.host!r}: {exc.strerror}")
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return CliError(EXIT_CONNECT, f"cannot connect to {where}: {reason}")
    if isinstance(exc, ClientError | ValueError):
        return CliError(EXIT_ERROR, str(exc))
    raise exc


# --- subscribe --------------------------------------------------------------------------


def _is_plain_text(text: str) -> bool:
    return not text.startswith("base64:") and not any((c < " " and c != "\t") or c == "\x7f" for c in text)


def format_line(message: Message) -> bytes:
    """``CHANNEL IDENT PAYLOAD\\n`` (see the help text for the payload rule)."""
    try:
        text = message.payload.decode("utf-8")
        payload = text if _is_plain_text(text) else None
    except UnicodeDecodeError:
        payload = None
    if payload is None:
        payload = "base64:" + base64.b64encode(message.payload).decode("ascii")
    line = f"{message.channel} {message.ident} {payload}\n"
    return line.encode("utf-8", "surrogateescape")


def format_json(message: Message) -> bytes:
    """One JSON object and a newline; ``payload`` if UTF-8, else ``payload_b64``."""
    obj: dict[str, str] = {"channel": message.channel, "ident": message.ident}
    try:
        obj["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        obj["payload_b64"] = base64.b64encode(message.payload).decode("ascii")
    # A name that is not valid UTF-8 is held as lone surrogates; backslashreplace
    # writes them as the JSON escape \udcXX, so the line stays valid UTF-8.
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


async def _subscribe(opts: Options, as_json: bool, count: int | None, out: BinaryIO) -> int:
    fmt = format_json if as_json else format_line

    def report(err: BrokerError) -> None:
        _say(f"broker error: {err.message}")

    client = _client(opts, reconnect=True)
    try:
        await client.subscribe(*opts.channels)
        await client.connect()
        # Refusals of AUTH or of a channel at the start are fatal for the
        # command; a channel refused after a reconnect is a warning of the client.
        await client.wait_ready()
        if opts.verbose:
            _say(f"subscribed to {', '.join(opts.channels)} on {opts.host}:{opts.port} (broker {client.broker_name})")
        seen = 0
        while count is None or seen < count:
            try:
                batch = await client.messages()
            except (AuthenticationFailed, AccessDenied):
                raise
            except BrokerError as err:
                report(err)  # not fatal (e.g. a limit); the client carries on
                continue
            except StopAsyncIteration:
                break
            if count is not None:
                batch = batch[: count - seen]
            seen += len(batch)
            out.write(b"".join(fmt(m) for m in batch))
            out.flush()
        return EXIT_OK
    finally:
        await client.close(timeout_s=1.0)


# --- publish ------------------------------------------------------------------------------


async def _chunks(stream: BinaryIO) -> AsyncIterator[bytes]:
    """``stream``'s bytes as they come, read off the loop thread.

    A daemon thread reads the descriptor with ``os.read``: at a terminal the
    read blocks until a line or Ctrl-D, and Ctrl-C must end the command all
    the same. A thread of the default executor would be waited for at exit
    (Ctrl-C ignored until Ctrl-D), and one reading through the buffered
    ``sys.stdin.buffer`` holds its lock, which aborts the interpreter's exit
    ("Fatal Python error: _enter_buffered_busy"). One chunk is in flight at a
    time: the thread reads the next when the previous one was taken.
    """
    loop = asyncio.get_running_loop()
    # The thread's own descriptor: closing ``stream`` cannot hand its number
    # to another file the thread would then read.
    fd = os.dup(stream.fileno())
    queue: asyncio.Queue[bytes | OSError] = asyncio.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                try:
                    chunk: bytes | OSError = os.read(fd, STDIN_CHUNK_BYTES)
                except OSError as exc:
                    chunk = exc
                put = asyncio.run_coroutine_threadsafe(queue.put(chunk), loop)
                while not stop.is_set():
                    try:
                        put.result(timeout=INPUT_POLL_S)
                        break
                    except concurrent.futures.TimeoutError:
                        continue
                if not chunk or isinstance(chunk, OSError):
                    return
        except (RuntimeError, concurrent.futures.CancelledError):
            return  # the loop closed: the command ended meanwhile
        finally:
            os.close(fd)

    threading.Thread(target=read, name="hpfeeds-input", daemon=True).start()
    try:
        while True:
            chunk = await queue.get()
            if isinstance(chunk, OSError):
                name = getattr(stream, "name", "input")
                raise CliError(EXIT_ERROR, f"cannot read {name}: {chunk.strerror or chunk}")
            if not chunk:
                return
            yield chunk
    finally:
        stop.set()


async def _stdin_lines(stream: BinaryIO) -> AsyncIterator[bytes]:
    """Lines of ``stream`` without their ``\\n`` (or ``\\r\\n``)."""
    rest = b""
    async for chunk in _chunks(stream):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
    if rest:
        yield rest[:-1] if rest.endswith(b"\r") else rest


def _open_input(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CliError(EXIT_ERROR, f"cannot read {path}: {exc.strerror or exc}") from None


async def _payloads(ns: argparse.Namespace) -> AsyncIterator[bytes]:
    file_arg: str | None = ns.file
    if getattr(ns, "lines", False):
        stream = _open_input(file_arg) if file_arg else sys.stdin.buffer
        try:
            async for line in _stdin_lines(stream):
                yield line
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
    elif file_arg is not None:
        stream = _open_input(file_arg)
        try:
            yield b"".join([chunk async for chunk in _chunks(stream)])
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
    else:
        yield os.fsencode(" ".join(ns.payload))


async def _publish(opts: Options, ns: argparse.Namespace) -> int:
    # No reconnect: a command that returns 0 must have written every message
    # on one connection that the broker did not close or object to.
    client = _client(opts, reconnect=False)
    try:
        await client.connect()
        sent = 0
        async for payload in _payloads(ns):
            for channel in opts.channels:
                await client.publish(channel, payload)
            sent += 1
        await client.flush()
        await client.wait_ready(ns.wait)
        # Half-close and hear the broker out: a refused AUTH is reported even with --wait 0.
        await client.finish(timeout_s=max(ns.wait, DEFAULT_FINISH_S))
        if opts.verbose:
            _say(f"published {sent} message(s) to {', '.join(opts.channels)} on {opts.host}:{opts.port}")
        return EXIT_OK
    finally:
        await client.close(timeout_s=1.0)


# --- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.action == "sendfile":
        ns.lines, ns.payload = False, []
    elif ns.action == "publish" and ns.payload and (ns.file or ns.lines):
        parser.error("give the payload as arguments, or --file, or --lines; not several")
    elif ns.action == "publish" and not ns.payload and not ns.file and not ns.lines:
        parser.error("nothing to publish: give a payload, --file or --lines")
    opts = _options(parser, ns)

    debug = bool(getattr(ns, "debug", False))
    logging.basicConfig(format="hpfeeds: %(message)s", stream=sys.stderr)
    # The command prints its own one-line errors; the client's log adds
    # connection events with -v and everything with --debug. A subscriber
    # also prints the client's warnings: that it lost the broker and is
    # reconnecting (it is not silent for minutes while nothing can arrive),
    # a kick, a channel refused after a reconnect.
    quiet = logging.WARNING if ns.action == "subscribe" else logging.CRITICAL
    level = logging.DEBUG if debug else logging.INFO if opts.verbose else quiet
    logging.getLogger("hpfeeds3.client").setLevel(level)

    out: BinaryIO | None = None
    try:
        if ns.action == "subscribe":
            out = open(ns.output, "ab") if ns.output else sys.stdout.buffer  # noqa: SIM115
            return asyncio.run(_subscribe(opts, ns.json, ns.count, out))
        return asyncio.run(_publish(opts, ns))
    except KeyboardInterrupt:
        return EXIT_OK if ns.action == "subscribe" else EXIT_INTERRUPTED
    except BrokenPipeError:
        # `hpfeeds subscribe | head`: the reader left; that is a normal end.
        _silence_stdout()
        return EXIT_OK
    except Exception as exc:
        failure = _failure(exc, opts)
        _say(str(failure))
        return failure.code
    finally:
        if out is not None and out is not sys.stdout.buffer:
            out.close()


def _silence_stdout() -> None:
    # Python flushes stdout at exit; point it at /dev/null so that flush does
    # not print "Exception ignored ... BrokenPipeError".
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
