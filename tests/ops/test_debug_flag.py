"""``--debug`` logs frame-level detail (a refused frame's ERROR text, at DEBUG);
without it the broker logs nothing at DEBUG."""

from __future__ import annotations

from tests.support.broker import RawClient


def refuse_a_publish(port: int) -> None:
    with RawClient(port) as c:
        c.auth("bob", "bob-secret")
        c.publish("chan2", b"denied")  # bob may read chan2, not publish there
        assert c.expect_error() == "accessfail: bob may not publish to channel 'chan2'"


def test_debug_logs_refused_frames(start_broker) -> None:
    b = start_broker("--debug")
    refuse_a_publish(b.port)
    line = b.wait_log("accessfail: bob may not publish").splitlines()
    assert any(" DEBUG " in x and "(bob): accessfail: bob may not publish to channel 'chan2'" in x for x in line)


def test_without_debug_nothing_is_logged_at_debug(start_broker) -> None:
    b = start_broker()
    refuse_a_publish(b.port)
    b.wait_log("closed 127.0.0.1")  # the session ended and was logged
    assert " DEBUG " not in b.log()
