"""Logging for people (``--log-format text``) and for machines (``--log-format json``).

Contract:

- One record is one line on stderr, in both formats. Text that came from the
  network (idents, channel names, peer-sent text) may hold newlines, control
  characters or Unicode line separators: every non-printable character is
  escaped (``text.one_line`` for the message, whose client text was escaped
  where it was quoted; ``text.escape`` for field values, which also doubles a
  client's backslash), so a client can never forge a log line.
- Structured fields travel as ``extra=`` attributes of the record; only the
  names in ``FIELDS`` are ever written, so a secret passed by mistake (or any
  other attribute) never reaches the log::

      log.info("client authenticated",
               extra={"event": "authenticated", "peer": peer, "ident": ident})

  text: ``2025-01-02T03:04:05.678Z INFO hpfeeds3.broker.connection client authenticated
  event=authenticated peer=127.0.0.1:40000 ident=sensor-1`` (one line)

  json: ``{"ts": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "...",
  "msg": "client authenticated", "event": "authenticated", ...}`` (one line)

  The message says what happened in words; the fields carry the data, so the
  message need not repeat them. When it does, the text format does not write a
  field whose value the message already contains (a person reads it once); the
  JSON format always writes every field present.
- Records are formatted and written off the event loop: the logging call
  puts the record on a queue (``QueueHandler``) and one thread formats and
  writes, in order, every record queued meanwhile with one ``write`` (a
  ``QueueListener`` that batches). A connection's two INFO lines
  (``info_later``) cost the loop a clock read and a queue put each: the
  thread builds their message, fields and record as well.
  ``stop_logging()`` (run at exit too) writes every record still queued, so
  no line is lost at shutdown; ``flush_logging()`` waits until the queue is
  written.
- The queue is bounded: a sink that stops reading (a stuck journald or log
  shipper, a full pipe) must not grow the broker. Past ``MAX_QUEUED_RECORDS``
  records are dropped and counted (``dropped_lines()``, the metric
  ``hpfeeds_broker_log_lines_dropped_total``), and once the sink takes lines
  again one line says how many were dropped. Shutdown waits for a stalled
  sink at most ``STOP_WAIT_S``; the lines still queued then are lost (and the
  writer writes to the descriptor directly, so a thread stuck in a write
  never holds a lock the interpreter needs at exit).
- Field values may be ``str``, ``bytes`` (decoded as UTF-8, invalid bytes
  escaped), a ``(host, port)`` tuple (``host:port``), an enum (its value) or
  anything with a ``str()``.
"""

from __future__ import annotations

import atexit
import enum
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

from .text import escape, one_line

# Record attributes written when present, in this order.
FIELDS: tuple[str, ...] = ("event", "peer", "ident", "owner", "channel", "reason", "limit")

FORMATS = ("text", "json")

# Marks the handler installed here, so configure_logging() can be called again.
_HANDLER_FLAG = "_hpfeeds3_handler"


def _word(c: str) -> bool:
    return c.isalnum() or c == "_" or c == "-"


def _says(message: str, value: str) -> bool:
    """Whether ``value`` stands in ``message`` as a whole token (not inside a longer word).

    Sentence punctuation may follow ("closed 1.2.3.4:5: shutdown"), more of a
    name may not. Plain string scanning: this runs for every field of every
    connection event, and a regex built per value would be compiled each time.
    """
    start = message.find(value)
    size = len(value)
    while start != -1:
        before = message[start - 1] if start else " "
        if not (before.isalnum() or before in "_-.:"):
            after = message[start + size : start + size + 2]
            if not after:
                return True
            first = after[0]
            if not (first.isalnum() or first in "_-" or (first in ".:" and len(after) == 2 and _word(after[1]))):
                return True
        start = message.find(value, start + 1)
    return False


_second_cache: list[Any] = [None, ""]
# ".000Z" .. ".999Z": a formatted int costs more than the rest of the timestamp.
_MILLIS = tuple(f".{m:03d}Z" for m in range(1000))


def _timestamp(created: float) -> str:
    """ISO 8601, UTC, milliseconds: sorts as text, parses everywhere."""
    seconds = int(created)
    cache = _second_cache
    if cache[0] != seconds:  # one strftime per second, not per record
        cache[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return cache[1] + _MILLIS[int((created - seconds) * 1000)]


def field_value(value: Any) -> str:
    """One field as text (not yet escaped)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, tuple) and len(value) >= 2 and isinstance(value[1], int):
        host = str(value[0])
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


class TextFormatter(logging.Formatter):
    """``TIMESTAMP LEVEL LOGGER MESSAGE key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(record.created, record.levelname, record.name, record.getMessage(), record.__dict__)
        # A traceback is for a person reading a bug report: kept on its own lines.
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    @staticmethod
    def line(created: float, level: str, logger: str, message: str, attributes: Mapping[str, Any]) -> str:
        """The line of a record made of these (``attributes``: the record's, or just its fields)."""
        # Written for speed (every connection formats two lines): the
        # attributes read once, strings taken as they are.
        line = f"{_timestamp(created)} {level} {logger} {one_line(message)}"
        for name in FIELDS:
            value = attributes.get(name)
            if value is None:
                continue
            if value.__class__ is bytes:
                value = value.decode("utf-8", "surrogateescape")  # escape() writes an invalid byte as \xNN
            elif value.__class__ is not str:
                value = field_value(value)
            if value:
                start = message.find(value)
                if start != -1:
                    # "peer 1.2.3.4:5 authenticated as x" already says it: not repeated.
                    # Between spaces or brackets (or the ends) it is a whole token, as
                    # _says decides, here without a call: the fields of the lines every
                    # connection logs.
                    end = start + len(value)
                    if (start == 0 or message[start - 1] in " (") and (end == len(message) or message[end] in " )"):
                        continue
                    if _says(message, value):
                        continue
                value = escape(value)
            if not value or " " in value or '"' in value or "=" in value:
                value = json.dumps(value, ensure_ascii=False)
            line += f" {name}={value}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj = self._object(record.created, record.levelname, record.name, record.getMessage(), record.__dict__)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return _json_line(obj)

    @classmethod
    def line(cls, created: float, level: str, logger: str, message: str, attributes: Mapping[str, Any]) -> str:
        """The line of a record made of these (``attributes``: the record's, or just its fields)."""
        return _json_line(cls._object(created, level, logger, message, attributes))

    @staticmethod
    def _object(created: float, level: str, logger: str, message: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = {"ts": _timestamp(created), "level": level, "logger": logger, "msg": message}
        for name in FIELDS:
            value = attributes.get(name)
            if value is not None:
                obj[name] = field_value(value)
        return obj


def _json_line(obj: dict[str, Any]) -> str:
    # ensure_ascii: control characters and odd code points become \u escapes,
    # so a record is always exactly one line of plain ASCII.
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))


# Formatters that write a line from its parts (``line``) without a record.
_LINE_FORMATTERS = (TextFormatter, JsonFormatter)


class _DeferredHandler(logging.handlers.QueueHandler):
    """Queues the record as it is: formatting happens in the writer thread.

    The stock ``prepare`` formats the message and copies the record on the
    caller's thread, which is the work this handler exists to move. Only the
    message text is fixed here (``msg % args``, cheap), so that an argument
    changed after the call cannot change the line; the fields given with
    ``extra=`` are values (strings, bytes, tuples, enums).
    """

    def __init__(self, pipeline: _Pipeline) -> None:
        super().__init__(pipeline.queue)  # type: ignore[arg-type]
        self.pipeline = pipeline
        self._qsize = pipeline.queue.qsize

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self._qsize() >= MAX_QUEUED_RECORDS:
            self.pipeline.drop()
            return
        self.queue.put_nowait(record)

    def put_later(self, item: tuple[float, str, LazyLine]) -> None:
        """A line for the writer to build (``info_later``), bounded as records are."""
        if self._qsize() >= MAX_QUEUED_RECORDS:
            self.pipeline.drop()
            return
        self.queue.put_nowait(item)


# The writer thread wakes this often and writes every record queued meanwhile
# with one write(). Woken by each record instead, it would cost the event loop
# a thread wake-up (a futex system call and a context switch) per log line,
# more than formatting the line; a log line may be this late, no more.
_WRITE_INTERVAL_S = 0.02
_STOP = object()
# Records waiting for the writer at most (about 1 KiB each): a burst of ten
# thousand connections' lines while the sink is slow for a second fits; a sink
# stalled for longer costs dropped lines, not memory.
MAX_QUEUED_RECORDS = 8_192
# How long shutdown waits for the writer to write what is queued.
STOP_WAIT_S = 2.0

_dropped_before = 0  # lines dropped by pipelines stopped earlier in this process


def dropped_lines() -> int:
    """Log lines dropped so far because the queue was full (the sink did not keep up)."""
    pipeline = _pipeline
    return _dropped_before + (pipeline.dropped if pipeline is not None else 0)


def _raw_writer(stream: TextIO) -> Any:
    """``os.write`` on the stream's descriptor when it has one (after flushing
    what the stream buffered), else the stream's own ``write`` and ``flush``.

    A thread blocked in ``os.write`` holds no lock of the ``io`` stack, so an
    interpreter exiting around a stalled sink does not wait for it."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0:

        def write_stream(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write_stream
    stream.flush()
    encoding = getattr(stream, "encoding", None) or "utf-8"

    def write_fd(text: str) -> None:
        view = memoryview(text.encode(encoding, "backslashreplace"))
        while view:
            view = view[os.write(fd, view) :]

    return write_fd


class _Pipeline:
    """The queue, the thread that formats and writes, and the handler that feeds it.

    The thread is a ``QueueListener`` that batches: every ``_WRITE_INTERVAL_S``
    it takes every record queued and writes their lines with one ``write`` and
    one flush. Putting a record on a ``SimpleQueue`` nobody waits on is one C
    call for the event loop. Lines stay whole and in order: one thread writes.
    """

    def __init__(self, writer: logging.StreamHandler[TextIO]) -> None:
        self.writer = writer
        self._write_text = _raw_writer(writer.stream)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.handler = _DeferredHandler(self)
        setattr(self.handler, _HANDLER_FLAG, True)
        self.dropped = 0  # records dropped at the bound (any thread, under _drop_lock)
        self._reported = 0  # of those, how many a "dropped" line has told (writer thread)
        self._drop_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="hpfeeds3-log-writer", daemon=True)
        self.thread.start()

    def drop(self) -> None:
        with self._drop_lock:
            self.dropped += 1

    def _run(self) -> None:
        get_nowait = self.queue.get_nowait
        while True:
            batch = []
            while True:
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            if (batch or self.dropped != self._reported) and self._write(batch):
                return
            time.sleep(_WRITE_INTERVAL_S)

    def _write(self, batch: list[Any]) -> bool:
        """Write the records of ``batch``; wake the flushes waiting in it; True at the stop mark."""
        writer = self.writer
        lines, flushed, stop = [], [], False
        for item in batch:
            if item.__class__ is tuple:
                try:
                    lines.append(later_line(writer, item))
                except Exception:
                    writer.handleError(_unbuilt_record(item[1]))
            elif isinstance(item, logging.LogRecord):
                try:
                    lines.append(writer.format(item))
                except Exception:
                    writer.handleError(item)
            elif item is _STOP:
                stop = True
            else:
                flushed.append(item)
        dropped = self.dropped - self._reported
        if dropped:  # the sink took the last batch: say what it missed
            self._reported += dropped
            lines.append(writer.format(_dropped_record(dropped)))
        if lines:
            try:
                self._write_text("\n".join(lines) + "\n")
            except Exception:
                writer.handleError(batch[0] if batch else _dropped_record(dropped))
        for event in flushed:
            event.set()
        return stop

    def flush(self) -> None:
        done = threading.Event()
        self.queue.put(done)
        done.wait()

    def stop(self) -> bool:
        """Write what is queued, in order, and stop the thread; the writer then
        takes the queue handler's place and writes each record at once.

        False if the sink did not take the queued lines within ``STOP_WAIT_S``:
        the queue handler is then removed and nothing more is written."""
        self.queue.put(_STOP)
        self.thread.join(STOP_WAIT_S)  # every record queued before the stop mark is written
        root = logging.getLogger()
        if self.thread.is_alive():  # the sink is stalled: stop logging rather than wait
            root.handlers = [h for h in root.handlers if h is not self.handler]
            return False
        setattr(self.writer, _HANDLER_FLAG, True)
        # One assignment: a record logged meanwhile goes to one of the two, never both.
        root.handlers = [self.writer if h is self.handler else h for h in root.handlers]
        while True:  # records queued by another thread after the stop mark
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item.__class__ is tuple:
                try:
                    item = _later_record(item)
                except Exception:
                    self.writer.handleError(_unbuilt_record(item[1]))
                    continue
            if isinstance(item, logging.LogRecord):
                self.writer.handle(item)
        return True


def later_line(writer: logging.Handler, item: tuple[float, str, LazyLine]) -> str:
    """The line of an ``info_later`` item: from its parts when the formatter is ours, no record made."""
    formatter = writer.formatter
    if formatter.__class__ in _LINE_FORMATTERS:
        created, logger, line = item
        if line.fields_said and formatter.__class__ is TextFormatter:
            # What TextFormatter.line writes for it, without looking for each field.
            message = line.text()
            if message.isprintable():
                return f"{_timestamp(created)} INFO {logger} {message}"
        return formatter.line(created, "INFO", logger, line.text(), line.fields())  # type: ignore[union-attr]
    return writer.format(_later_record(item))


def _unbuilt_record(logger: str) -> logging.LogRecord:
    """What ``handleError`` reports for an ``info_later`` line that raised while built."""
    return logging.LogRecord(logger, logging.INFO, "(unknown file)", 0, "a log line could not be built", None, None)


def _later_record(item: tuple[float, str, LazyLine]) -> logging.LogRecord:
    created, name, line = item
    return _info_record(name, created, line.text(), line.fields())


_pipeline: _Pipeline | None = None
_pipeline_lock = threading.Lock()
_atexit_registered = False


def configure_logging(
    fmt: str = "text", debug: bool = False, *, stream: TextIO | None = None, background: bool = True
) -> None:
    """Install one handler on the root logger (replacing one installed earlier by this function).

    ``debug`` lowers the level to DEBUG (also for asyncio); otherwise INFO, with
    chatty libraries held at WARNING. With ``background`` (the default) records
    are formatted and written by a thread; call ``stop_logging()`` before the
    process ends (it is also registered with ``atexit``).
    """
    global _pipeline, _atexit_registered
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    writer = logging.StreamHandler(stream if stream is not None else sys.stderr)
    writer.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())

    stop_logging()
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_FLAG, False):
            root.removeHandler(old)
            old.close()
    if background:
        with _pipeline_lock:
            _pipeline = _Pipeline(writer)
            root.addHandler(_pipeline.handler)
            if not _atexit_registered:
                atexit.register(stop_logging)
                _atexit_registered = True
    else:
        setattr(writer, _HANDLER_FLAG, True)
        root.addHandler(writer)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Every connection logs two records: skip what no format here prints (the
    # caller's file and line, thread and process names), as the logging HOWTO's
    # "Optimization" section describes. A traceback still names its frames.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    quiet = logging.DEBUG if debug else logging.WARNING
    for name in ("asyncio", "aiohttp.access", "aiohttp.server", "nats", "asyncpg"):
        logging.getLogger(name).setLevel(quiet)


# Records made by info_event, per logger: the attributes every record of that
# logger shares (name, level, "(unknown file)", no thread or process names).
_templates: dict[str, dict[str, Any]] = {}


# Python 3.12+ records name their asyncio task (logging.logAsyncioTasks). Looked
# up once: a getattr that misses raises and catches an AttributeError, which
# cost more than the rest of the check.
_TASK_NAMES = hasattr(logging, "logAsyncioTasks")


def _plain_records() -> bool:
    """Whether records carry nothing but what ``configure_logging`` asks for:
    the standard factory, and no caller, thread, process or task names."""
    return (
        logging._srcfile is None  # type: ignore[attr-defined]
        and not logging.logThreads
        and not logging.logProcesses
        and not logging.logMultiprocessing
        and not (_TASK_NAMES and logging.logAsyncioTasks)  # type: ignore[attr-defined]
        and logging.getLogRecordFactory() is logging.LogRecord
    )


def info_event(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """``logger.info(message, extra=fields)`` at half the cost, for the lines every
    connection logs (connected, authenticated, closed).

    ``Logger.makeRecord`` spends most of its time on attributes no format here
    prints (file and module names, thread and process); the record is instead
    a copy of one made once by the real constructor, with its time, message
    and fields set. It goes through ``logger.handle`` like any record (filters,
    every handler). With any of those attributes asked for again, this is
    ``logger.info``.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    if not _plain_records():
        logger.info(message, extra=fields)
        return
    logger.handle(_info_record(logger.name, time.time(), message, fields))


def _info_record(name: str, created: float, message: str, fields: dict[str, Any]) -> logging.LogRecord:
    """An INFO record of logger ``name``, a copy of one made once by the real constructor."""
    template = _templates.get(name)
    if template is None:
        logger = logging.getLogger(name)
        model = logger.makeRecord(name, logging.INFO, "(unknown file)", 0, "", (), None)
        template = _templates[name] = model.__dict__
    record = _new_record(logging.LogRecord)
    attributes = record.__dict__ = template.copy()
    attributes["created"] = created
    attributes["msecs"] = int((created - int(created)) * 1000) + 0.0
    attributes["relativeCreated"] = (created - _start_time) * 1000
    attributes["msg"] = message
    attributes.update(fields)
    return record


class LazyLine(Protocol):
    """What ``info_later`` logs: an INFO line's message and fields, built when it is written.

    ``fields_said``: the message names every field (each non-empty) as a whole
    token, so the text format drops them all; when the message is printable,
    its line is the message after the timestamp, level and logger.
    """

    @property
    def fields_said(self) -> bool: ...

    def text(self) -> str: ...

    def fields(self) -> dict[str, Any]: ...


def info_later(logger: logging.Logger, line: LazyLine) -> None:
    """``info_event(logger, line.text(), line.fields())``, with the message, the
    fields and the record built by the writer thread, not by the caller.

    The caller pays a clock read and a queue put: this is what the lines every
    connection logs cost the event loop. ``line`` must not change once given
    (events are values). It applies while the record would go nowhere but to
    the writer: records of the standard attributes only (``_plain_records``),
    and no filter or other handler from ``logger`` up to the root, whose one
    handler is this module's. Otherwise (a test's capture handler, a filter)
    it is ``info_event``, so every handler and filter sees the record.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    pipeline = _pipeline
    if pipeline is None or not _plain_records() or not _only_the_writer(logger, pipeline.handler):
        info_event(logger, line.text(), line.fields())
        return
    pipeline.handler.put_later((time.time(), logger.name, line))


def _only_the_writer(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Whether a record of ``logger`` would reach ``handler`` alone, unfiltered (as ``Logger.handle``
    and ``callHandlers`` go: the logger's filters and handlers, then its parents' while it propagates)."""
    current: Any = logger
    while True:
        if current.filters or current.disabled:
            return False
        handlers = current.handlers
        if current.parent is None or not current.propagate:
            return len(handlers) == 1 and handlers[0] is handler and not handler.filters
        if handlers:
            return False
        current = current.parent


_new_record = object.__new__
_start_time: float = logging._startTime  # type: ignore[attr-defined]


def _dropped_record(n: int) -> logging.LogRecord:
    return logging.LogRecord(
        "hpfeeds3.broker.logs",
        logging.WARNING,
        "(unknown file)",
        0,
        f"{n} log lines dropped: the log output did not keep up (hpfeeds_broker_log_lines_dropped_total)",
        None,
        None,
    )


def flush_logging() -> None:
    """Wait until every record logged so far has been written."""
    pipeline = _pipeline
    if pipeline is not None:
        pipeline.flush()


def stop_logging() -> None:
    """Write every queued record and stop the logging thread; later records are
    written directly. Idempotent; safe to call when nothing was configured."""
    global _pipeline, _dropped_before
    with _pipeline_lock:
        pipeline, _pipeline = _pipeline, None
    if pipeline is not None:
        _dropped_before += pipeline.dropped
        if pipeline.stop():
            pipeline.writer.flush()
