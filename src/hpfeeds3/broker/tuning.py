"""Tuning constants of the broker, each with why it has its value.

Limits an operator sets (frame size, timeouts, connection counts, buffers) are
in ``config.Limits`` with a flag each; these are the internal numbers that
shape how the broker does its work, kept in one place.
"""

from __future__ import annotations

# --- listeners ---------------------------------------------------------------

# Descriptors kept free for listeners, the auth store, logs and the exporter
# when the connection cap is derived from the open-files limit.
RESERVED_FDS = 64
# listen() backlog: a reconnect storm of thousands of sensors queues here
# while the loop accepts; the kernel caps it at net.core.somaxconn (4,096 on
# current Linux). At 1,024, a storm of 10,000 overflowed it and the dropped
# sensors waited out their connect timeout: 10,000 served in ~12 s instead
# of ~2.4 s (hpfeeds-bench storm). Asked for the most listen() takes, so an
# operator who raises somaxconn gets the longer queue (docs/operations.md).
LISTEN_BACKLOG = 65535
# Listening sockets per endpoint, one SO_REUSEPORT group on one port. The loop
# (libuv, under uvloop) accepts one connection per listener per loop turn, so
# in a storm the broker accepted at the rate of its turns, each of which also
# runs handshakes: 10,000 SYNs within half a second overflowed a queue of 4,096
# and the dropped sensors came back a second later (2.3 s instead of 1.1 s,
# benchmarks/RESULTS.md). N listeners accept N a turn into N queues, each of
# somaxconn; the kernel spreads connections over them by address hash. What
# waits is still in the kernel, not in the broker's descriptors.
LISTENERS_PER_ENDPOINT = 4

# --- authentication ------------------------------------------------------------

# An auth lookup that takes longer than this fails the AUTH (store
# unavailable): the client gets a clear error instead of waiting for the
# AUTH deadline.
AUTH_LOOKUP_TIMEOUT_S = 2.0

# A lookup that was in flight while the key store changed is repeated, so a
# key removed meanwhile is not used (revocation has no window); after this
# many attempts in a row that each saw a change, the AUTH fails as "store
# unavailable" rather than trusting an answer that may be stale.
AUTH_LOOKUP_ATTEMPTS = 3
# Distinct channel lists whose byte sets are shared between connections
# (10,000 sensors with the same key hold one set); cleared when full.
MAX_CHANNEL_SETS = 10_000

# --- subscribers' outgoing buffers ------------------------------------------------

# Above this many queued bytes a subscriber is "backlogged" and watched ...
BACKLOG_HIGH_BYTES = 256 * 1024
# ... until its queue falls below this.
BACKLOG_LOW_BYTES = 64 * 1024
# How often a backlogged subscriber's progress is checked.
BACKLOG_CHECK_S = 0.5
# A connection closed with an ERROR gets this long to flush it before abort.
CLOSE_FLUSH_S = 1.0
# After an ERROR that closes a connection, what the client still sends is
# read and discarded for up to this long (its pipelined frames would
# otherwise turn our close into a reset that destroys the ERROR).
CLOSE_LINGER_S = 1.0
# ... and for at most this many bytes: enough for frames pipelined behind a
# refused AUTH; a client that keeps sending is flooding, and is reset.
CLOSE_LINGER_BYTES = 64 * 1024

# --- fairness between connections -------------------------------------------------

# A pre-auth connection whose bytes arrived this recently is making progress
# (a TLS handshake, an AUTH frame) and is not closed to make room for a
# newcomer (admission.py): a round trip on a slow link, with margin. An
# attacker cannot keep a connection "progressing" for free: each TLS flight
# must be valid, and a trickled frame meets --min-receive-rate.
PROGRESS_WINDOW_S = 2.0
# At the pre-auth bound, an idle member is closed for a newcomer only while at
# least 1/IDLE_SHARE_TO_EVICT of the pool is idle (admission.py). A pool nearly
# all making progress is a reconnect storm at the broker's pace: its few idle
# members were accepted a moment ago, their first bytes on the way (a TLS storm
# of 10,000 cut 500-2,000 such members, 10-120 ms old, turning each into a
# retry). A flood of silent connections makes the pool idle, and is cut as
# before; to hold more than 7/8 of it "progressing" an attacker must keep
# sending valid handshake bytes, each ClientHello a full handshake's work.
IDLE_SHARE_TO_EVICT = 8
# While the pre-auth pool is full of connections making progress, newcomers
# are held back unread; they are looked at again at least this often.
HELD_BACK_RECHECK_S = 0.1
# ... and one held back this long is started over the pool's bound (it still
# counts against --max-connections and its address's share): a client gives
# up after its connect timeout (hpfeeds3's: 10 s for TCP, TLS and INFO), so a
# longer hold only turns a sensor into a retry that queues again, and the
# pool full of handshakes waiting on their clients' round trips would leave
# the broker idle meanwhile. Half the client's timeout leaves the other half
# for the handshake itself under load.
HELD_BACK_MAX_S = 5.0

# A frame whose header has arrived gets this long on top of its size divided
# by --min-receive-rate: a small frame on a congested link is not cut.
PARTIAL_FRAME_GRACE_S = 5.0

# Frames that need a full check (control frames, the first PUBLISH of a run)
# handled per event-loop turn for one connection. One 256 KiB read can hold
# 20,000 SUBSCRIBE/UNSUBSCRIBE frames (~150 ms of work): past this many the
# rest waits for the next turn, reading paused, so other clients are not
# delayed by more than a few milliseconds.
CHECKED_FRAMES_PER_TURN = 1024

# TLS records are decrypted inside the per-turn budget (tls.py). One SSL_read
# processes every record fed to it, so encrypted bytes are fed in steps of
# this many: 2 KiB is at most about 75 KeyUpdates (each a key derivation,
# ~16 us), about 1 ms, before the records-without-data bound is checked.
TLS_FEED_BYTES = 2048
# ... and at most this many bytes (one read of the transport) or records a
# turn per connection; the rest waits, reading paused, for a later turn.
TLS_BYTES_PER_TURN = 256 * 1024
TLS_RECORDS_PER_TURN = 1024
# Plaintext bytes a record must bring on average once the handshake is done;
# records short of it count against --max-tls-records-without-data. A record
# costs OpenSSL about 1.3 us whatever it holds, so this bounds the cost per
# plaintext byte of tiny records (tests/reliability/test_tls_records.py
# records it). Clients write a frame per record or more, and a frame is at
# least 8 bytes (SUBSCRIBE with a one-byte ident and channel), 20 or more with
# real idents and channel names.
TLS_MIN_RECORD_PLAINTEXT = 16

# --- cluster (the NATS backplane) ---------------------------------------------------

# Retry cadence while NATS is unreachable (first connect and reconnects): a
# restarted NATS is rejoined within about a second, and a NATS that is down
# costs one connection attempt per second.
CLUSTER_RECONNECT_WAIT_S = 1.0
# A NATS that keeps its socket open but stops answering (stopped, wedged) is
# declared lost after this many unanswered pings this far apart (about a
# minute; nats-py's default is 2 x 120 s): /healthz then says degraded and the
# client reconnects.
CLUSTER_PING_INTERVAL_S = 20
CLUSTER_MAX_OUTSTANDING_PINGS = 3
# Consecutive runs of one channel waiting in the outbox are joined into one
# NATS message up to this size: one NATS message per 256 KiB rather than one
# per read keeps cross-node traffic near a million small messages per second,
# and stays well below any server's max_payload (bigger data is split).
CLUSTER_JOIN_BYTES = 256 * 1024
# Room kept in every NATS message for our headers (origin, sequence, count,
# part): the server counts headers against its max_payload.
CLUSTER_HEADER_ALLOWANCE_BYTES = 1024
# Split frames being reassembled at once, over all origins and channels, hold
# at most this many largest frames' worth of bytes. A broker sends the parts
# of one frame back to back, so each origin has about one in flight per
# channel; past this the oldest is dropped (counted ``reassembly_full``).
CLUSTER_REASSEMBLY_FRAMES = 8
# The NATS client's own buffer of commands not yet written to its socket
# (nats-py's default): with the outbox bound it caps what one slow NATS costs.
CLUSTER_NATS_PENDING_BYTES = 2 * 1024 * 1024
# Messages received from NATS for one channel and not yet handed to the
# router; past it the NATS client drops them and the sequence gap counts them.
# Delivery is synchronous, so this fills only while the event loop is stalled.
CLUSTER_SUB_PENDING_BYTES = 64 * 1024 * 1024
# A rejected message from NATS is logged once per origin per this interval
# (every one is counted); at most this many origins are remembered.
CLUSTER_REJECT_LOG_INTERVAL_S = 60.0
CLUSTER_REJECT_LOG_ORIGINS = 1024

# At shutdown, how long the cluster link's tasks get to finish after being
# cancelled: nats.connect retrying an unreachable server may not notice.
CLUSTER_CLOSE_WAIT_S = 2.0

# --- memory ------------------------------------------------------------------

# The cyclic GC's thresholds (Python's default: 700, 10, 10). A handshake
# allocates some hundred container objects that reference counting frees at
# the close; at the default a reconnect storm ran a young collection every
# few handshakes and promoted live connections into older generations, which
# were then scanned again: about 0.23 s of CPU per 10,000-sensor storm, and
# 0.11-0.17 s at these (about 10 us a handshake), for a young generation of a
# few MiB at most. The middle generation is collected every 20 young
# collections instead of 10, so a connection that lives is scanned less often.
GC_THRESHOLDS = (10_000, 20, 10)
