"""The Router's seam to other brokers: a typed ``Backplane``, a null one by default."""

from __future__ import annotations

from hpfeeds3.broker.backplane import NULL_BACKPLANE, Backplane, NullBackplane
from hpfeeds3.broker.router import Router


class Sink:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def deliver(self, data: bytes) -> None:
        self.got.append(data)

    def delivery_failed(self) -> None:
        raise AssertionError("deliver does not raise")


class Recorder(NullBackplane):
    """A backplane that writes down what the router tells it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, int]] = []

    def forward(self, channel: bytes, data: bytes, count: int) -> None:
        self.calls.append(("forward", channel, count))

    def want(self, channel: bytes) -> None:
        self.calls.append(("want", channel, 0))

    def unwant(self, channel: bytes) -> None:
        self.calls.append(("unwant", channel, 0))


def test_a_router_without_a_backplane_delivers_locally() -> None:
    router = Router()
    sink = Sink()
    router.subscribe(b"c", sink)
    router.publish(b"c", b"frames", 2)
    assert sink.got == [b"frames"]
    assert router.deliveries[b"c"] == 2
    assert isinstance(NULL_BACKPLANE, NullBackplane)


def test_the_backplane_hears_first_and_last_subscriber_and_every_local_publish() -> None:
    bp = Recorder()
    backplane: Backplane = bp
    router = Router(backplane)
    a, b = Sink(), Sink()
    router.subscribe(b"c", a)
    router.subscribe(b"c", b)
    router.publish(b"c", b"x", 1)
    router.deliver_local(b"c", b"from-elsewhere", 1)  # not forwarded again
    router.unsubscribe(b"c", a)
    router.unsubscribe(b"c", b)
    assert bp.calls == [("want", b"c", 0), ("forward", b"c", 1), ("unwant", b"c", 0)]
    assert a.got == [b"x", b"from-elsewhere"]


def test_attach_tells_the_backplane_the_channels_already_wanted() -> None:
    router = Router()
    router.subscribe(b"early", Sink())
    bp = Recorder()
    router.attach(bp)
    router.publish(b"early", b"x", 1)
    assert bp.calls == [("want", b"early", 0), ("forward", b"early", 1)]
