"""The connection's clock-driven policies with a fake clock: plain numbers in, decisions out."""

from __future__ import annotations

from hpfeeds3.broker.policies import BacklogBounds, Linger, ReceiveRate, SlowConsumerWatch

BOUNDS = BacklogBounds(hard_bytes=1000, soft_bytes=100, soft_window_s=60.0, stall_timeout_s=10.0)


def test_the_hard_bound_cuts_at_once() -> None:
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=50, sent=50)
    assert watch.check(0.5, queued=1001, sent=1051) == "outgoing buffer over its hard bound"


def test_a_subscriber_that_drains_nothing_is_cut_at_the_stall_timeout() -> None:
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=50, sent=50)
    for t in range(1, 10):
        assert watch.check(float(t), queued=50, sent=50) is None  # nothing drained, not long enough
    assert watch.check(10.0, queued=50, sent=50) == "nothing drained for 10 s"


def test_draining_resets_the_stall_clock() -> None:
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=50, sent=50)
    assert watch.check(9.0, queued=50, sent=50) is None
    assert watch.check(9.5, queued=40, sent=50) is None  # 10 bytes drained
    assert watch.check(19.0, queued=40, sent=50) is None
    assert watch.check(19.5, queued=40, sent=50) == "nothing drained for 10 s"


def test_new_bytes_written_are_not_taken_for_progress() -> None:
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=50, sent=50)
    # 30 bytes added, none drained: the queue grew by exactly what was written.
    assert watch.check(5.0, queued=80, sent=80) is None
    assert watch.check(10.0, queued=80, sent=80) == "nothing drained for 10 s"


def test_over_the_soft_bound_for_the_soft_window_is_cut_while_draining() -> None:
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=500, sent=500)
    queued, sent = 500, 500
    t = 0.0
    while True:
        t += 0.5
        sent += 10  # 10 bytes written and 11 drained every check: progress, but never below the soft bound
        queued -= 1
        why = watch.check(t, queued=queued, sent=sent)
        if why is not None:
            break
    assert why == "outgoing buffer over its soft bound for 60 s"
    assert t == 60.5  # the soft bound was first seen at the first check (0.5 s)


def test_dropping_below_the_soft_bound_restarts_its_window() -> None:
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=500, sent=500)
    assert watch.check(50.0, queued=400, sent=500) is None
    assert watch.check(55.0, queued=90, sent=500) is None  # below: the window ends
    assert watch.check(56.0, queued=200, sent=700) is None  # above again: a new window
    assert watch.check(115.0, queued=199, sent=700) is None
    assert watch.check(116.0, queued=198, sent=700) == "outgoing buffer over its soft bound for 60 s"


def test_closeness_is_the_nearest_of_the_three_rules() -> None:
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=50, sent=50)
    assert watch.closeness(0.0, 50) == 0.05  # bytes toward the hard bound
    assert watch.closeness(6.0, 50) == 0.6  # nothing drained for 6 of 10 s
    assert watch.check(6.0, queued=40, sent=50) is None  # it drained: the stall clock restarts
    assert watch.closeness(7.0, 40) == 0.1
    watch = SlowConsumerWatch(BOUNDS, now=0.0, queued=500, sent=500)
    for t in range(1, 46):  # draining, over the soft bound: 45 of its 60 s
        assert watch.check(float(t), queued=500, sent=500 + 10 * t) is None
    assert watch.closeness(46.0, 500) == 0.75  # over it since the first check (1 s)


def test_receive_deadline_is_scaled_to_the_frame_size() -> None:
    rate = ReceiveRate(rate_bytes=1000, grace_s=5.0)
    assert rate.allowed_s(10_000) == 15.0
    assert rate.allowed_s(500) == 5.5
    assert rate.why(500) == "a 500-byte frame did not arrive at 1000 bytes/s"
    assert rate.error(500) == "a 500-byte frame did not arrive within 6 s (at least 1000 bytes/s)"


def test_linger_discards_up_to_its_bound() -> None:
    linger = Linger(max_bytes=100)
    assert linger.read(60) and linger.read(40)
    assert not linger.read(1)
