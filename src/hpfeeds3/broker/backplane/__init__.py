"""Backplane: how one broker's Router reaches the Routers of other brokers.

The Router is handed one ``Backplane`` (``NULL_BACKPLANE`` in a single
process; ``nats.NatsBackplane`` for ``--cluster``). It calls ``forward`` for
every local publish run and ``want``/``unwant`` when this node starts or stops
needing a channel; the backplane delivers what other nodes publish through
the ``deliver`` callable it was built with (``Router.deliver_local``).

``forward``, ``want`` and ``unwant`` run on the hot path: synchronous, O(1),
never awaiting and never raising.
"""

from __future__ import annotations

from typing import Protocol


class Backplane(Protocol):
    @property
    def connected(self) -> bool:
        """Whether other nodes are reachable now (``/healthz`` says ``degraded`` otherwise)."""

    @property
    def status(self) -> str:
        """One word for ``/healthz``: ``connected``, ``connecting``, ``unreachable``, ..."""

    def forward(self, channel: bytes, data: bytes, count: int) -> None:
        """Send ``count`` local PUBLISH frames of ``channel`` (``data``, unchanged) to the other nodes."""

    def want(self, channel: bytes) -> None:
        """A local client subscribed to ``channel``, and none did before."""

    def unwant(self, channel: bytes) -> None:
        """The last local subscriber of ``channel`` left."""

    async def start(self) -> None:
        """Begin linking in the background; never blocks on the network."""

    async def close(self) -> None:
        """Stop within a bounded time."""


class NullBackplane:
    """A single broker: nothing to forward, nobody to tell."""

    connected = True
    status = "single"

    def forward(self, channel: bytes, data: bytes, count: int) -> None:
        pass

    def want(self, channel: bytes) -> None:
        pass

    def unwant(self, channel: bytes) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


NULL_BACKPLANE: Backplane = NullBackplane()
