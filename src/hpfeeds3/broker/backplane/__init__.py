"""Backplane: how one broker's Router reaches the Routers of other brokers.

None for a single process; NATS (``--cluster nats://...``) for a cluster. The
Router calls ``forward`` for every local publish run and tells the backplane
when this node starts or stops needing a channel; the backplane delivers
remote publishes with ``Router.deliver_local``.
"""
