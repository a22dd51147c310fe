"""--log-format text|json: one line per record, the connection fields, never a secret."""

from __future__ import annotations

import enum
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from hpfeeds3.broker.logs import configure_logging

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class Reason(enum.StrEnum):
    SLOW_CONSUMER = "slow_consumer"


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream, logging.getLogger("hpfeeds3.broker.connection")
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


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
    out = stream.getvalue()
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
        record = json.loads(stream.getvalue())
        assert record["channel"] == evil + "\\xff"
        assert record["msg"] == f"denied {evil}"


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
    out = stream.getvalue()
    assert "RuntimeError: boom" in out
    if fmt == "json":
        (line,) = lines(stream)
        assert "RuntimeError: boom" in json.loads(line)["exc"]


def test_debug_lowers_the_level_and_reconfiguring_replaces_the_handler(capture) -> None:
    stream, log = capture
    configure_logging("text", stream=stream)
    log.debug("hidden")
    assert stream.getvalue() == ""
    second = io.StringIO()
    configure_logging("json", debug=True, stream=second)
    log.debug("shown")
    assert stream.getvalue() == ""  # the first handler is gone: no line written twice
    assert json.loads(second.getvalue())["msg"] == "shown"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="--log-format"):
        configure_logging("xml")
