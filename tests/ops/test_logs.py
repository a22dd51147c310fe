"""--log-format text|json: one line per record, the connection fields, never a secret."""

from __future__ import annotations

import contextlib
import enum
import io
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpfeeds3.broker.events import Authenticated, Closed, Connected, log_event
from hpfeeds3.broker.logs import (
    TextFormatter,
    _says,
    _timestamp,
    configure_logging,
    flush_logging,
    info_event,
    info_later,
    later_line,
    stop_logging,
)
from hpfeeds3.broker.reasons import CloseReason

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class Reason(enum.StrEnum):
    SLOW_CONSUMER = "slow_consumer"


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream, logging.getLogger("hpfeeds3.broker.connection")
    stop_logging()
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
    root.setLevel(saved[1])


def text(stream: io.StringIO) -> str:
    """What the logging thread has written once every record so far is written."""
    flush_logging()
    return stream.getvalue()


def lines(stream: io.StringIO) -> list[str]:
    return text(stream).splitlines()


def test_text_line_has_timestamp_level_logger_message_and_fields(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    log.info(
        "handshake done",
        extra={"event": "authenticated", "peer": ("127.0.0.1", 40000), "ident": "sensor-1"},
    )
    (line,) = lines(stream)
    assert re.fullmatch(
        TS + r" INFO hpfeeds3\.broker\.connection handshake done"
        r" event=authenticated peer=127\.0\.0\.1:40000 ident=sensor-1",
        line,
    ), line


@pytest.mark.parametrize("debug", [False, True])
def test_a_connection_s_connect_is_logged_with_debug_only(capture, debug: bool) -> None:
    """Its AUTH (or its close) names the same peer: at INFO a handshake logs two lines, not three."""
    stream, _ = capture
    configure_logging("text", debug=debug, stream=stream)
    for event in (
        Connected("127.0.0.1:40000", 1),
        Authenticated("127.0.0.1:40000", 1, "sensor-1"),
        Closed("127.0.0.1:40000", 1, "sensor-1", CloseReason.CLIENT_CLOSED),
    ):
        log_event(event)
    said = [line.split(" ", 3)[3] for line in lines(stream) if " hpfeeds3.broker.connection " in line]
    expected = ["127.0.0.1:40000 authenticated as sensor-1", "closed 127.0.0.1:40000 (sensor-1): client_closed"]
    assert said == (["connected from 127.0.0.1:40000", *expected] if debug else expected)


def test_json_line_has_the_documented_keys(capture) -> None:
    stream, log = capture
    configure_logging("json", stream=stream)
    log.info(
        "connection closed",
        extra={
            "event": "closed",
            "peer": ("::1", 5),
            "ident": b"sensor-1",
            "reason": Reason.SLOW_CONSUMER,
            "channel": "cowrie.sessions",
        },
    )
    (line,) = lines(stream)
    record = json.loads(line)
    assert re.fullmatch(TS, record.pop("ts"))
    assert record == {
        "level": "INFO",
        "logger": "hpfeeds3.broker.connection",
        "msg": "connection closed",
        "event": "closed",
        "peer": "[::1]:5",
        "ident": "sensor-1",
        "reason": "slow_consumer",
        "channel": "cowrie.sessions",
    }


def test_json_omits_fields_the_record_does_not_have(capture) -> None:
    stream, log = capture
    configure_logging("json", stream=stream)
    log.warning("broker listening on %s", "tcp://0.0.0.0:10000")
    record = json.loads(lines(stream)[0])
    assert set(record) == {"ts", "level", "logger", "msg"}
    assert record["msg"] == "broker listening on tcp://0.0.0.0:10000"
    assert record["level"] == "WARNING"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_secret_passed_by_mistake_is_never_written(capture, fmt: str) -> None:
    stream, log = capture
    configure_logging(fmt, stream=stream)
    log.info("auth", extra={"ident": "sensor-1", "secret": "hunter2", "digest": b"\x01" * 20, "password": "hunter2"})
    out = text(stream)
    assert "hunter2" not in out
    assert "secret" not in out and "password" not in out and "digest" not in out
    assert "sensor-1" in out


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_hostile_network_text_cannot_forge_a_line(capture, fmt: str) -> None:
    stream, log = capture
    configure_logging(fmt, stream=stream)
    evil = "x\n2025-01-01T00:00:00.000Z INFO forged\r"
    log.info("denied %s", evil, extra={"channel": evil.encode() + b"\xff", "ident": evil})
    assert len(lines(stream)) == 1
    if fmt == "json":
        record = json.loads(text(stream))
        assert record["channel"] == evil + "\\xff"
        assert record["msg"] == f"denied {evil}"


def test_a_hostile_field_value_without_spaces_is_escaped_in_text(capture) -> None:
    """A value with no space, quote or ``=`` is written unquoted: it must still be escaped."""
    stream, log = capture
    configure_logging("text", stream=stream)
    log.info("denied", extra={"ident": "x\nFORGED\u2028y", "channel": b"c\r\x1b[31m"})
    (line,) = lines(stream)
    assert line.endswith(" denied ident=x\\x0aFORGED\\u2028y channel=c\\x0d\\x1b[31m"), line


def test_text_does_not_repeat_what_the_message_says(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    log.info(
        "%s authenticated as %s",
        "127.0.0.1:40000",
        "sensor-1",
        extra={"event": "authenticated", "peer": "127.0.0.1:40000", "ident": "sensor-1", "channel": "c"},
    )
    assert lines(stream)[0].endswith(" 127.0.0.1:40000 authenticated as sensor-1 channel=c")
    log.info("closed %s: %s", "127.0.0.1:40000", "shutdown", extra={"peer": "127.0.0.1:40000", "reason": "shutdown"})
    assert lines(stream)[1].endswith(" closed 127.0.0.1:40000: shutdown")
    log.info("closed 10.0.0.1:4000", extra={"peer": "10.0.0.1:40"})  # a prefix of a longer value is not it
    assert lines(stream)[2].endswith(" closed 10.0.0.1:4000 peer=10.0.0.1:40")


def test_a_field_is_left_out_exactly_when_the_message_says_it_as_a_whole_token() -> None:
    """The formatter's quick check for a value between spaces or brackets decides as
    ``_says`` does: every message of up to four of these pieces, every value."""
    pieces = ["v", " ", "(", ")", ":", ".", "_", "-", "a", "1"]
    for size in range(5):
        for parts in itertools.product(pieces, repeat=size):
            message = "".join(parts)
            alone = TextFormatter.line(0.0, "INFO", "l", message, {})
            for value in ("v", "v:v", "v.1"):
                left_out = TextFormatter.line(0.0, "INFO", "l", message, {"ident": value}) == alone
                assert left_out == (value in message and _says(message, value)), (message, value)


def test_the_timestamp_has_milliseconds_in_utc() -> None:
    assert _timestamp(5.0) == "1970-01-01T00:00:05.000Z"
    assert _timestamp(86400 + 61.0625) == "1970-01-02T00:01:01.062Z"
    assert _timestamp(1.999) == "1970-01-01T00:00:01.999Z"


def test_text_quotes_values_with_spaces_and_equals(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    log.info("denied", extra={"channel": "a b=c", "reason": ""})
    assert lines(stream)[0].endswith(' channel="a b=c" reason=""')


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_exceptions_are_kept(capture, fmt: str) -> None:
    stream, log = capture
    configure_logging(fmt, stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("bug in connection", extra={"event": "error"})
    out = text(stream)
    assert "RuntimeError: boom" in out
    if fmt == "json":
        (line,) = lines(stream)
        assert "RuntimeError: boom" in json.loads(line)["exc"]


def test_debug_lowers_the_level_and_reconfiguring_replaces_the_handler(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    log.debug("hidden")
    assert text(stream) == ""
    second = io.StringIO()
    configure_logging("json", debug=True, stream=second)
    log.debug("shown")
    assert text(stream) == ""  # the first handler is gone: no line written twice
    assert json.loads(text(second))["msg"] == "shown"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="--log-format"):
        configure_logging("xml")


def test_stop_logging_writes_every_queued_record_in_order(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    for i in range(5000):
        log.info("record %d", i, extra={"event": "n", "peer": ("127.0.0.1", i)})
    stop_logging()  # no flush before: the queue may still hold most of them
    log.info("after stop")  # written directly, after the queued ones
    got = stream.getvalue().splitlines()
    assert len(got) == 5001
    assert [int(line.split(" record ")[1].split()[0]) for line in got[:5000]] == list(range(5000))
    assert got[-1].endswith(" after stop")
    stop_logging()  # idempotent


def test_a_record_s_text_is_fixed_when_it_is_logged(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    state = ["before"]
    log.info("state %s", state)
    state[0] = "after"
    assert lines(stream)[0].endswith(" state ['before']")


CONNECTIONS = 1000
LINE = re.compile(
    TS + r" INFO hpfeeds3\.broker\.connection "
    r"(?:(?P<a>\S+) authenticated as bench|closed (?P<x>\S+) \(bench\): shutdown)"
)


class SlowReader:
    """Reads a broker's output 4 KiB at a time with a pause between reads, like
    a busy log collector: the broker's last lines are still queued when its
    main thread finishes, and are lost unless they are written before exit."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            self.chunks.append(chunk)
            time.sleep(0.02)

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def test_a_storm_of_1000_connections_logs_2000_whole_lines_none_lost_at_shutdown(tmp_path) -> None:
    """1,000 sensors (each from its own loopback address) connect, authenticate,
    subscribe and publish; the broker is
    stopped while all are connected, so their 1,000 'closed' lines are logged
    during shutdown, the last thing the process does."""
    from hpfeeds3.bench.credentials import bench_channels, bench_key
    from hpfeeds3.bench.handshake import Handshaker, raise_open_files_limit
    from hpfeeds3.bench.storm import sensor_address
    from hpfeeds3.bench.wire import Target
    from tests.support.broker import BROKER_BIN, free_port, wait_for_port, write_users_json

    assert raise_open_files_limit() > CONNECTIONS + 100
    write_users_json(tmp_path / "users.json", {"bench": bench_key("bench", "bench", bench_channels())})
    port = free_port()
    proc = subprocess.Popen(
        [BROKER_BIN, "--bind", f"127.0.0.1:{port}", "--auth", "users.json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    reader = SlowReader(proc)
    target = Target(host="127.0.0.1", port=port, ident=b"bench", secret=b"bench", channel=b"bench")
    hs = None
    try:
        wait_for_port(port, timeout=15, proc=proc)
        hs = Handshaker(target, shared_channels=True)
        pending = {
            hs.start(target.slot_channel(i % 50), b"storm:%d" % i, source=sensor_address(i)).fd
            for i in range(CONNECTIONS)
        }
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for conn in hs.step(1.0):
                pending.discard(conn.fd)
        assert not pending, f"{len(pending)} handshakes did not complete"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        reader.thread.join(30)
    finally:
        if hs is not None:
            hs.shutdown()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log_lines = reader.text().splitlines()
    events: dict[str, list[str]] = {}
    for line in log_lines:
        m = LINE.fullmatch(line)
        if m:
            kind = next(k for k in "ax" if m.group(k))
            events.setdefault(m.group(kind), []).append(kind)
    sensors = {peer: seq for peer, seq in events.items() if "a" in seq}  # not the readiness probe
    lines_seen = sum(map(len, sensors.values()))
    print(f"\n{len(log_lines)} log lines; {lines_seen} of the {len(sensors)} sensors' connections")
    assert len(sensors) == CONNECTIONS and lines_seen == 2 * CONNECTIONS, "\n".join(log_lines[-5:])
    assert all(seq == ["a", "x"] for seq in sensors.values()), [s for s in sensors.values() if s != ["a", "x"]]
    # every other line is whole too: nothing cut, nothing interleaved
    others = [line for line in log_lines if not LINE.fullmatch(line)]
    assert all(re.match(TS + r" (INFO|WARNING) hpfeeds3\.", line) for line in others), others[:10]
    assert log_lines[-1].endswith("broker stopped")


class Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_info_event_writes_the_line_logger_info_writes(capture, fmt: str) -> None:
    """The connection events' cheaper record (``info_event``) is, once written,
    the record ``logger.info`` makes: same line but for the time, same fields,
    seen by every handler."""
    stream, log = capture
    configure_logging(fmt, stream=stream)
    watcher = Seen()
    seen = watcher.records
    log.addHandler(watcher)
    try:
        fields = {"event": "closed", "peer": "127.0.0.1:40000", "ident": "sensor\n1", "reason": "client_closed"}
        log.info("closed 127.0.0.1:40000 (sensor\n1): client_closed", extra=fields)
        info_event(log, "closed 127.0.0.1:40000 (sensor\n1): client_closed", fields)
    finally:
        log.removeHandler(watcher)
    slow, fast = (re.sub(TS, "TS", line) for line in lines(stream))
    assert fast == slow
    assert [r.__dict__.keys() for r in seen[1:]] == [seen[0].__dict__.keys()]
    assert seen[1].created >= seen[0].created and seen[1].levelname == "INFO" and seen[1].name == log.name


def test_info_event_is_logger_info_when_records_must_name_their_thread(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    watcher = Seen()
    seen = watcher.records
    log.addHandler(watcher)
    logging.logThreads = True
    try:
        info_event(log, "connected from 127.0.0.1:40000", {"event": "connected", "peer": "127.0.0.1:40000"})
        thread = threading.Thread(target=info_event, args=(log, "from a thread", {"event": "connected"}))
        thread.start()
        thread.join()
    finally:
        logging.logThreads = False
        log.removeHandler(watcher)
    assert [r.threadName for r in seen] == [threading.current_thread().name, thread.name]
    assert len(lines(stream)) == 2


@contextlib.contextmanager
def writer_alone() -> Iterator[None]:
    """The log writer as the root's one handler (as in the broker): pytest's capture handlers
    are set aside meanwhile."""
    root = logging.getLogger()
    others = [h for h in root.handlers if not getattr(h, "_hpfeeds3_handler", False)]
    for handler in others:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            root.addHandler(handler)


class Line:
    """What ``info_later`` is given: a message and fields, built when asked (and counted)."""

    fields_said = False

    def __init__(self, message: str, fields: dict[str, str]) -> None:
        self.message, self.field_values, self.built = message, fields, 0

    def text(self) -> str:
        self.built += 1
        return self.message

    def fields(self) -> dict[str, str]:
        return self.field_values


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_info_later_writes_the_line_info_event_writes_built_by_the_writer(capture, fmt: str) -> None:
    """With the writer the only handler, the line is built off the caller's thread, and
    reads as ``info_event``'s (and so ``logger.info``'s) but for the time."""
    stream, log = capture
    configure_logging(fmt, stream=stream)
    fields = {"event": "closed", "peer": "[::1]:40000", "ident": "sensor\n1", "reason": "client_closed"}
    message = "closed [::1]:40000 (sensor\n1): client_closed"
    later = Line(message, fields)
    with writer_alone():
        info_event(log, message, fields)
        info_later(log, later)
        assert later.built == 0  # not built by the caller
    first, second = (re.sub(TS, "TS", line) for line in lines(stream))
    assert second == first
    assert later.built == 1


def test_info_later_goes_through_every_other_handler_and_filter(capture) -> None:
    """A handler (a test's capture, an operator's) or a filter on the way sees the record
    as ``logger.info`` makes it: the shortcut is taken only when nothing but the writer reads it."""
    stream, log = capture
    configure_logging("text", stream=stream)
    watcher = Seen()
    later = Line("connected from 127.0.0.1:40000", {"event": "connected", "peer": "127.0.0.1:40000"})
    with writer_alone():
        log.addHandler(watcher)
        try:
            info_later(log, later)
        finally:
            log.removeHandler(watcher)
    (record,) = watcher.records
    assert record.getMessage() == "connected from 127.0.0.1:40000" and record.peer == "127.0.0.1:40000"  # type: ignore[attr-defined]
    dropped = logging.Filter("nothing.matches")
    with writer_alone():
        logging.getLogger("hpfeeds3.other").addFilter(dropped)  # not on the way: records pass
        log.addFilter(dropped)  # on the way: the record is filtered out
        try:
            info_later(log, Line("filtered", {"event": "connected"}))
        finally:
            log.removeFilter(dropped)
            logging.getLogger("hpfeeds3.other").removeFilter(dropped)
        info_later(log, Line("written", {"event": "connected"}))
    assert [line.split(" ", 3)[3] for line in lines(stream)] == [
        "connected from 127.0.0.1:40000",
        "written event=connected",
    ]


_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.just("?"),
)
_peers = st.builds(lambda host, port: f"{host}:{port}", _hosts, st.integers(0, 65535))


@given(
    _peers,
    st.text(min_size=1, max_size=40),
    st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    st.sampled_from(list(CloseReason)),
    st.floats(0, 2e9),
)
def test_the_writer_s_line_of_a_handshake_event_is_the_formatter_s(
    peer: str, ident: str, closed_ident: str | None, why: CloseReason, created: float
) -> None:
    """The lines every connection logs (fields_said) are written without looking for each
    field; whatever the ident (spaces, quotes, escapes, an ident that is also a word of the
    line), the line is the one TextFormatter writes from the message and the fields."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(TextFormatter())
    logger = "hpfeeds3.broker.connection"
    for event in (Authenticated(peer, 1, ident), Closed(peer, 1, closed_ident, why)):
        assert event.fields_said
        expected = TextFormatter.line(created, "INFO", logger, event.text(), event.fields())
        assert later_line(handler, (created, logger, event)) == expected
