"""Realistic bugs, each with the tests that must catch it (``tests/mutation/run.py`` applies them).

A mutant is one or more exact text replacements in one file. ``original`` must
occur exactly once in that file (``test_mutants.py`` checks it, so this list
does not rot when the code moves: update the text with the code). ``tests``
are pytest node ids or files, run with ``-x`` against a copy of the tree
carrying the bug: a failing run kills the mutant.

Add a mutant when a bug got past the suite: the bug as it was, and the test
written for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (original, replacement), applied in order
    tests: tuple[str, ...]
    why: str  # the bug, as a user would feel it


def mutant(name: str, path: str, original: str, replacement: str, *tests: str, why: str) -> Mutant:
    return Mutant(name, path, ((original, replacement),), tests, why)


CODEC = "src/hpfeeds3/protocol/codec.py"
SESSION = "src/hpfeeds3/broker/session.py"
ROUTER = "src/hpfeeds3/broker/router.py"
ADMISSION = "src/hpfeeds3/broker/admission.py"
RATELIMIT = "src/hpfeeds3/broker/ratelimit.py"
TCPACK = "src/hpfeeds3/broker/durable/tcpack.py"
SEGMENTS = "src/hpfeeds3/broker/durable/segments.py"
DURABLE_FORMAT = "src/hpfeeds3/broker/durable/format.py"
ACTIVITY = "src/hpfeeds3/broker/admin/activity.py"
BOUNDARY = "src/hpfeeds3/broker/boundary.py"
CLUSTER_WIRE = "src/hpfeeds3/broker/backplane/wire.py"
POLICIES = "src/hpfeeds3/broker/policies.py"
CONSOLE_JS = "src/hpfeeds3/broker/admin/static/app.js"
REDACT = "src/hpfeeds3/broker/redact.py"
SQLITE_STORE = "src/hpfeeds3/broker/auth/sqlite.py"
_FORGET_IDENTS = (
    '                cur.executemany("DELETE FROM idents WHERE ident = ?", [(i,) for i in batch.forget_idents])\n'
)
_REMEMBER_PAIRS = '                cur.executemany("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?)", batch.pairs)\n'

MUTANTS: tuple[Mutant, ...] = (
    # --- protocol -----------------------------------------------------------------------
    mutant(
        "codec-run-uncapped",
        CODEC,
        "or not overhead <= length <= max_publish",
        "or not overhead <= length",
        "tests/protocol/test_codec.py",
        why="a PUBLISH that continues a run in the same read has no size cap",
    ),
    Mutant(
        "codec-cap-exclusive",
        CODEC,
        (
            ("if not HEADER_LEN <= length <= max_len[opcode]:", "if not HEADER_LEN <= length < max_len[opcode]:"),
            ("    if length > cap:", "    if length >= cap:"),
        ),
        ("tests/protocol/test_codec.py",),
        why="a frame exactly at the cap is refused",
    ),
    mutant(
        "codec-empty-channel",
        CODEC,
        "if not n or not m or c + m > frame_end:",
        "if not n or c + m > frame_end:",
        "tests/protocol/test_codec.py",
        why="a PUBLISH with an empty channel name is accepted",
    ),
    mutant(
        "codec-auth-digest-at-least",
        CODEC,
        "if opcode == OP_AUTH and n and frame_end - c == DIGEST_LEN:",
        "if opcode == OP_AUTH and n and frame_end - c >= DIGEST_LEN:",
        "tests/protocol/test_codec.py",
        why="an AUTH whose digest is longer than 20 bytes is accepted, its digest cut to what follows the ident",
    ),
    mutant(
        "codec-subscribe-empty-ident",
        CODEC,
        "elif opcode == OP_SUBSCRIBE and n and c < frame_end:",
        "elif opcode == OP_SUBSCRIBE and c < frame_end:",
        "tests/protocol/test_codec.py",
        why="a SUBSCRIBE with an empty ident is accepted",
    ),
    mutant(
        "codec-run-of-one-whole-read",
        CODEC,
        "data = buf if pos == 0 else buf[pos:end]",
        "data = buf",
        "tests/broker/test_session_properties.py::test_decoder_runs_expand_to_the_frames_received",
        why="a PUBLISH that ends a read after other frames is forwarded with the frames before it",
    ),
    mutant(
        "codec-run-prefix-short",
        CODEC,
        "or buf[pos + HEADER_LEN : pos + overhead] != prefix",
        "or buf[pos + HEADER_LEN : pos + overhead - 1] != prefix[:-1]",
        "tests/broker/test_session_properties.py::test_decoder_runs_expand_to_the_frames_received",
        why="a PUBLISH on a channel that differs from the one before it only in its last byte joins its run",
    ),
    mutant(
        "codec-run-shorter-same-length",
        CODEC,
        "elif length != first_length:",
        "elif length > first_length:",
        "tests/protocol/test_codec.py::test_a_run_counts_each_payload_at_its_own_length",
        why="a run whose later frames are shorter than its first counts every payload at the first's length",
    ),
    mutant(
        "session-size-classes-short",
        "src/hpfeeds3/broker/session.py",
        "SIZE_CLASSES = 33",
        "SIZE_CLASSES = 32",
        "tests/broker/test_session_properties.py::test_the_largest_payload_a_frame_can_carry_has_a_size_class",
        why="a PUBLISH of more than 2 GiB (a larger --max-message-size) raises IndexError in the size histogram",
    ),
    mutant(
        "logs-said-line-unescaped",
        "src/hpfeeds3/broker/logs.py",
        "if message.isprintable():",
        "if True:",
        "tests/ops/test_logs.py::test_the_writer_s_line_of_a_handshake_event_is_the_formatter_s",
        why="an ident with a line break in it starts a forged log line",
    ),
    mutant(
        "deadlines-no-slack",
        "src/hpfeeds3/broker/deadlines.py",
        "self._slack_s = slack_s",
        "self._slack_s = 0.0",
        "tests/broker/test_deadlines.py",
        why="a flood of silent connections wakes the loop once per connection to time each out",
    ),
    mutant(
        "deadlines-set-again-in-place",
        "src/hpfeeds3/broker/deadlines.py",
        "            del due[member]  # to the end: the order is the deadlines'",
        "            pass",
        "tests/broker/test_deadlines.py",
        why="a deadline set again keeps its place, and the connections behind it are timed out late",
    ),
    mutant(
        "sign-secret-first",
        "src/hpfeeds3/protocol/auth.py",
        "hashlib.sha1(nonce + secret)",
        "hashlib.sha1(secret + nonce)",
        "tests/protocol/test_codec.py",
        why="the AUTH digest is SHA1(secret + nonce): no other hpfeeds client can log in",
    ),
    mutant(
        "verify-anything",
        "src/hpfeeds3/protocol/auth.py",
        "return hmac.compare_digest(sign(nonce, secret), digest)",
        "return True",
        "tests/protocol/test_codec.py",
        why="any digest authenticates",
    ),
    # --- permissions and fan-out (wire) -----------------------------------------------------
    mutant(
        "subscribe-with-pubchans",
        SESSION,
        "elif channel not in self.subchans:",
        "elif channel not in self.subchans | self.pubchans:",
        "tests/wire/test_decisions.py",
        why="a key may subscribe to a channel it may only publish to",
    ),
    mutant(
        "publish-any-channel",
        SESSION,
        "if run.ident != self.ident_bytes or channel not in self.pubchans:",
        "if run.ident != self.ident_bytes:",
        "tests/wire/test_decisions.py",
        why="a key may publish to any channel",
    ),
    mutant(
        "publish-spoofed-ident",
        SESSION,
        "if run.ident != self.ident_bytes or channel not in self.pubchans:",
        "if channel not in self.pubchans:",
        "tests/wire/test_decisions.py",
        why="a client may publish as another ident",
    ),
    mutant(
        "subscribe-keeps-fanout",
        ROUTER,
        "members[sub] = None\n        self._fanout.pop(channel, None)",
        "members[sub] = None",
        "tests/wire/test_pubsub.py",
        why="a subscriber that arrives after a channel's first publish gets nothing",
    ),
    mutant(
        "unsubscribe-keeps-fanout",
        ROUTER,
        "del members[sub]\n        self._fanout.pop(channel, None)",
        "del members[sub]",
        "tests/wire/test_pubsub.py",
        why="an UNSUBSCRIBE does not stop delivery",
    ),
    # --- limits -------------------------------------------------------------------------
    mutant(
        "preauth-evicts-first-address",
        ADMISSION,
        "network = self._networks.top()",
        "network = next(iter(self._networks.counts), None)",
        "tests/broker/test_admission.py",
        why="at the total pre-auth bound the first network's connection is closed, not the busiest's",
    ),
    mutant(
        "preauth-per-address-off-by-one",
        ADMISSION,
        "if len(members) > self.limit_per_group:",
        "if len(members) >= self.limit_per_group:",
        "tests/broker/test_admission.py",
        why="an address gets one pre-auth slot fewer than --max-unauthenticated-per-address",
    ),
    mutant(
        "preauth-fresh-never-ranked",
        ADMISSION,
        "        if self._fresh:\n            self._rank_fresh()\n",
        "",
        "tests/broker/test_admission.py",
        why="members admitted since the last decision are never candidates: the flood's newest stay, a sensor goes",
    ),
    mutant(
        "preauth-progress-leaves-fresh-idle",
        ADMISSION,
        "if seen is None and self._fresh.pop(member, None) is None:",
        "if seen is None:",
        "tests/broker/test_admission.py",
        why="a new connection whose handshake bytes arrive is still closed for a newcomer",
    ),
    mutant(
        "preauth-storm-cuts-its-idle",
        ADMISSION,
        "        if (total - len(self._progressing)) * IDLE_SHARE_TO_EVICT < limit:\n            return False\n",
        "",
        "tests/broker/test_admission.py",
        why="in a reconnect storm the pool cuts the sensors accepted a moment ago, which retry and add to the crowd",
    ),
    mutant(
        "plain-auth-bytes-not-progress",
        "src/hpfeeds3/broker/connection.py",
        "if session.state == PRE_AUTH or session.state == AUTHING:",
        "if False:",
        "tests/wire/test_decisions.py::test_unauthenticated_cap_spares_the_oldest_while_its_auth_is_arriving",
        why="a sensor whose AUTH arrives in pieces over a slow link is the one closed for a flood's newcomer",
    ),
    mutant(
        "limiter-fast-path-ignores-blocks",
        RATELIMIT,
        "return bool(self._addresses.blocks or self._pairs.blocks)",
        "return False",
        "tests/wire/test_auth_limits.py",
        why="a blocked guesser keeps guessing: AUTHs are let through without checking the blocks",
    ),
    mutant(
        "limiter-window-never-slides",
        RATELIMIT,
        "while failures and failures[0] < window_start:",
        "while False:",
        "tests/broker/test_ratelimit.py",
        why="failed AUTHs never leave the window: one failure every 30 s is blocked after 15",
    ),
    mutant(
        "limiter-blocks-one-late",
        RATELIMIT,
        "if len(failures) < self.limit or self.blocked(key, now):",
        "if len(failures) <= self.limit or self.blocked(key, now):",
        "tests/broker/test_ratelimit.py",
        why="a guesser gets one more try than the limit",
    ),
    mutant(
        "partial-frames-close-smallest",
        "src/hpfeeds3/broker/state.py",
        "ident = max(by_ident, key=by_ident.__getitem__)",
        "ident = min(by_ident, key=by_ident.__getitem__)",
        "tests/reliability/test_attacks.py::test_past_the_partial_frames_bound_the_largest_holder_is_closed",
        why="past --max-partial-frames the ident holding the least loses a connection, not the one holding the most",
    ),
    mutant(
        "tls-records-without-data-unbounded",
        "src/hpfeeds3/broker/tls.py",
        "if self._debt > self._max_debt:",
        "if self._debt > 1000 * self._max_debt:",
        "tests/broker/test_tls_session.py::test_records_without_data_past_the_bound_raise",
        why="a client's KeyUpdates or one-byte TLS records are decrypted without end",
    ),
    mutant(
        "hard-bound-ten-times-loose",
        "src/hpfeeds3/broker/connection.py",
        "transport.get_write_buffer_size() > self.broker.send_hard_bytes:",
        "transport.get_write_buffer_size() > 10 * self.broker.send_hard_bytes:",
        "tests/reliability/test_slow_consumers.py::test_the_hard_bound_cuts_a_burst_at_the_delivery_that_crosses_it",
        why="a burst piles up to 10x the hard bound before a stalled subscriber is cut",
    ),
    mutant(
        "server-fd-table-not-presized",
        "src/hpfeeds3/broker/server.py",
        "    presize_fd_table(broker.max_connections + RESERVED_FDS + http_fds)\n",
        "",
        "tests/wire/test_fd_table.py::test_a_serving_broker_holds_a_table_for_every_connection_it_may_accept",
        why="a reconnect storm stalls the loop in accept() at each growth of the descriptor table",
    ),
    mutant(
        "server-fd-table-leaks-a-descriptor",
        "src/hpfeeds3/broker/fdtable.py",
        "os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, descriptors - 1))",
        "fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, descriptors - 1)",
        "tests/wire/test_fd_table.py::test_presize_grows_the_table_and_leaves_no_descriptor_open",
        why="the broker holds a descriptor it never uses, one of its connection cap's",
    ),
    mutant(
        "server-fd-table-past-the-limit",
        "src/hpfeeds3/broker/fdtable.py",
        "        descriptors = min(descriptors, soft)\n",
        "",
        "tests/wire/test_fd_table.py::test_presize_stops_at_the_open_files_limit",
        why="a connection cap above the open-files limit leaves the table ungrown (F_DUPFD refuses)",
    ),
    mutant(
        "state-ident-index-keeps-the-last",
        "src/hpfeeds3/broker/state.py",
        "            self.by_ident[ident] = {held, conn}",
        "            self.by_ident[ident] = conn",
        "tests/wire/test_revocation.py::test_revocation_closes_every_connection_of_the_ident_and_no_other",
        why="a removed key leaves an ident's earlier connections open once it has a second",
    ),
    Mutant(
        "state-ident-index-forgets-the-rest",
        "src/hpfeeds3/broker/state.py",
        (
            (
                "                held.discard(conn)\n                if len(held) == 1:",
                "                del self.by_ident[ident]\n                if False:",
            ),
        ),
        ("tests/wire/test_revocation.py::test_revocation_closes_every_connection_of_the_ident_and_no_other",),
        why="when one of an ident's connections leaves, a removed key no longer closes the others",
    ),
    # --- what reaches people -------------------------------------------------------------
    mutant(
        "log-field-unescaped",
        "src/hpfeeds3/broker/logs.py",
        "                value = escape(value)\n",
        "",
        "tests/ops/test_logs.py",
        why="an ident or channel with a newline forges a text log line",
    ),
    mutant(
        "console-text-as-markup",
        CONSOLE_JS,
        "  if (shown === s) return document.createTextNode(s);",
        '  if (shown === s) {\n    const t = document.createElement("span");\n    t.innerHTML = s;\n    return t;\n  }',
        "tests/console/test_browser.py::test_hostile_ident_channel_and_payload_render_inert",
        why="an ident, channel or payload holding markup runs as HTML in the operator's console",
    ),
    mutant(
        "console-bidi-not-escaped",
        CONSOLE_JS,
        "\\u200b-\\u200f\\u2028-\\u202e",
        "\\u200b-\\u200f\\u2028-\\u2029",
        "tests/console/test_browser_operator.py::test_hidden_characters_are_shown_escaped",
        why="a sensor named with a right-to-left override shows as another sensor's name in the console",
    ),
    mutant(
        "viewer-stops-watch",
        "src/hpfeeds3/broker/admin/api.py",
        "async def watch_stop(self, request: web.Request) -> web.StreamResponse:\n        self._admin(request)",
        "async def watch_stop(self, request: web.Request) -> web.StreamResponse:",
        "tests/console/test_api.py::test_a_viewer_gets_403_from_every_post_route_but_login_and_logout",
        why="a viewer may stop an admin's watch",
    ),
    mutant(
        "viewer-sees-disconnect",
        "src/hpfeeds3/broker/admin/static/app.js",
        '      if (isAdmin()) {\n        cells.push(\n          confirmButton("Disconnect",',
        '      if (true) {\n        cells.push(\n          confirmButton("Disconnect",',
        "tests/console/test_browser.py::test_viewer_sees_but_cannot_change",
        why="a viewer's page shows Disconnect buttons",
    ),
    # --- durable log ------------------------------------------------------------------------
    mutant(
        "durable-broker-close-clean",
        TCPACK,
        "return CloseKind.CLEAN if peer_fin and not reset and not closed_by_broker else CloseKind.ABORTIVE",
        "return CloseKind.CLEAN if peer_fin and not reset else CloseKind.ABORTIVE",
        "tests/durable/test_tcpack.py",
        why="a collector the broker cut after its FIN replays with no overlap: what sat unread in its buffer is lost",
    ),
    mutant(
        "durable-abortive-no-overlap",
        TCPACK,
        "offset = self.acked_plain if kind is CloseKind.CLEAN else self.acked_plain - self.overlap_bytes",
        "offset = self.acked_plain",
        "tests/durable/test_tcpack.py",
        why="a collector that died with messages acknowledged but unread never gets them",
    ),
    mutant(
        "durable-tls-ciphertext-as-plaintext",
        TCPACK,
        "proven = self.plain_written - (self.wire_written - acked_wire)",
        "proven = acked_wire",
        "tests/durable/test_tcpack.py",
        why="under TLS, acknowledged ciphertext is taken for plaintext: the position runs ahead, messages are skipped",
    ),
    mutant(
        "durable-marks-trimmed-inside-overlap",
        TCPACK,
        "limit = self.acked_plain - self.overlap_bytes",
        "limit = self.acked_plain",
        "tests/durable/test_tcpack.py",
        why="marks inside the overlap are forgotten: an abortive close replays from the acknowledged offset on",
    ),
    mutant(
        "durable-outq-ignores-transport-buffer",
        TCPACK,
        "in_kernel = wire_written - buffered",
        "in_kernel = wire_written",
        "tests/durable/test_tcpack.py",
        why="with SIOCOUTQ, bytes still in the transport's buffer count as acknowledged: unsent messages are skipped",
    ),
    mutant(
        "durable-last-mark-not-counted",
        TCPACK,
        "            if end > offset:\n                break",
        "            if end >= offset:\n                break",
        "tests/durable/test_tcpack.py",
        why="a collector that read everything and closed cleanly gets its last run again",
    ),
    mutant(
        "durable-max-bytes-drops-for-every-key",
        SEGMENTS,
        "if name != ch.name or at >= new_low or (ident is not None and who != ident):",
        "if name != ch.name or at >= new_low:",
        "tests/durable/test_segments.py",
        why="one key over --durable-max-bytes makes every durable key on the channel lose its oldest messages",
    ),
    mutant(
        "durable-drop-count-one-short",
        SEGMENTS,
        "self._dropped[who] = self._dropped.get(who, 0) + (new_low - at)",
        "self._dropped[who] = self._dropped.get(who, 0) + (new_low - at - 1)",
        "tests/durable/test_segments.py",
        why="the drop count shown for a key is one short per dropped segment",
    ),
    mutant(
        "durable-delete-segment-still-needed",
        SEGMENTS,
        "if low is not None and low < ch.segments[1].first_seq:",
        "if low is not None and low < ch.segments[1].first_seq - 1:",
        "tests/durable/test_segments.py",
        why="a segment is deleted while a key's position is still on its last message, which that key never gets",
    ),
    mutant(
        "durable-commit-past-the-end",
        SEGMENTS,
        "new = min(max(position, low), ch.next_seq)",
        "new = max(position, low)",
        "tests/durable/test_segments.py",
        why="a position committed beyond the log's end skips the messages published next",
    ),
    mutant(
        "durable-recovery-skips-checksum",
        DURABLE_FORMAT,
        "            if not check_record(raw, header, payload):\n                break",
        "            if len(payload) != header.length:\n                break",
        "tests/durable/test_segments.py",
        why="after a crash, a record whose bytes are damaged is replayed as if whole",
    ),
    mutant(
        "durable-recovery-reads-an-old-record",
        DURABLE_FORMAT,
        "if header is None or header.first_seq < result.end_seq or offset + header.size > size:",
        "if header is None or offset + header.size > size:",
        "tests/durable/test_segments.py",
        why="after a crash while a reused file was written, its old records are replayed as new messages",
    ),
    mutant(
        "durable-replaced-counted-clean",
        "src/hpfeeds3/broker/state.py",
        "older.feed_finish(CloseKind.ABORTIVE)",
        "older.feed_finish(CloseKind.CLEAN)",
        "tests/durable/test_broker_durable.py::test_what_a_replaced_connection_left_unread_goes_to_the_newer_one",
        why="a durable connection replaced by a newer one: what it had not read yet never reaches the newer one",
    ),
    mutant(
        "durable-mark-at-run-start",
        "src/hpfeeds3/broker/durable/feed.py",
        "tracker.wrote(size, wire_bytes=wire, channel=channel, position=chunk.end_seq)",
        "tracker.wrote(size, wire_bytes=wire, channel=channel, position=chunk.first_seq)",
        "tests/durable/test_broker_durable.py::test_backlog_then_live_and_a_clean_reconnect_repeats_nothing",
        why="a collector that read everything and reconnected cleanly gets each last chunk again",
    ),
    # --- the connection's error boundary --------------------------------------------------------
    mutant(
        "boundary-timer-unguarded",
        BOUNDARY,
        "return self.broker.loop.call_later(delay, self._run_guarded, target)",
        "return self.broker.loop.call_later(delay, target)",
        "tests/broker/test_guarded_boundary.py",
        why="a bug in one connection's timer escapes to the event loop: that connection is never closed",
    ),
    mutant(
        "boundary-callback-reraises",
        BOUNDARY,
        "            except Exception:\n                self.internal_error(where)\n                return None",
        "            except Exception:\n                self.internal_error(where)\n                raise",
        "tests/broker/test_guarded_boundary.py",
        why="a bug while handling one client's bytes reaches uvloop, which stops reading from that socket",
    ),
    # --- what a broker accepts from NATS ---------------------------------------------------------
    mutant(
        "cluster-channel-not-checked",
        CLUSTER_WIRE,
        "        if item.channel != channel:\n            return Rejected.CHANNEL\n",
        "",
        "tests/cluster/test_wire.py",
        why="anyone who may publish on one NATS subject injects messages into any hpfeeds channel",
    ),
    mutant(
        "cluster-signature-not-compared",
        CLUSTER_WIRE,
        'if not hmac.compare_digest(sent.encode("ascii", "replace"), wanted.encode()):',
        "if False:",
        "tests/cluster/test_wire.py",
        why="with --cluster-key-file, any 32-character signature is accepted: NATS users forge broker messages",
    ),
    mutant(
        "cluster-jump-trusted",
        CLUSTER_WIRE,
        "if not -self.window <= seq - expected <= self.window:",
        "if False:",
        "tests/cluster/test_wire.py",
        why="one forged sequence number far ahead makes every later message of the real broker look replayed",
    ),
    mutant(
        "cluster-replay-accepted",
        CLUSTER_WIRE,
        "            if seq < expected:\n                return Rejected.SEQUENCE\n",
        "",
        "tests/cluster/test_wire.py",
        why="a NATS message replayed (or redelivered) reaches the subscribers twice",
    ),
    mutant(
        "cluster-parts-out-of-order",
        CLUSTER_WIRE,
        "elif p is None or p.seq != seq or p.n != n or p.next != i:",
        "elif p is None or p.seq != seq or p.n != n:",
        "tests/cluster/test_wire.py",
        why="the parts of a split frame that arrive out of order are joined into a wrong frame",
    ),
    mutant(
        "cluster-count-not-checked",
        CLUSTER_WIRE,
        "    if frames != count:\n        return Rejected.COUNT\n",
        "",
        "tests/cluster/test_wire.py",
        why="a message that says one frame and carries many moves the sequence baseline wrongly: losses go uncounted",
    ),
    mutant(
        "cluster-entries-unbounded",
        CLUSTER_WIRE,
        "while len(self._entries) >= self.max_entries:",
        "while len(self._entries) > self.max_entries * 1000:",
        "tests/cluster/test_wire.py",
        why="fake origins on NATS grow a broker's memory without bound",
    ),
    # --- a subscriber that keeps up, a slow link, a closing client --------------------------------
    mutant(
        "slow-consumer-progress-ignores-new-bytes",
        POLICIES,
        "drained = self._last_queued + (sent - self._sent_at_check) - queued",
        "drained = self._last_queued - queued",
        "tests/broker/test_policies.py",
        why="a collector that reads as fast as messages come (its buffer level steady) is cut as stalled",
    ),
    mutant(
        "slow-consumer-soft-window-never-resets",
        POLICIES,
        "        else:\n            self._soft_since = None\n",
        "",
        "tests/broker/test_policies.py",
        why="a collector whose buffer passes the soft bound now and then is cut as if it stayed above it",
    ),
    mutant(
        "receive-rate-no-grace",
        POLICIES,
        "return self._grace_s + pending / self._rate",
        "return pending / self._rate",
        "tests/broker/test_policies.py",
        why="a sensor on a slow link is cut for a small frame whose bytes take a moment to arrive",
    ),
    mutant(
        "linger-unbounded",
        POLICIES,
        "return self.discarded <= self._max_bytes",
        "return True",
        "tests/broker/test_policies.py",
        why="a client told ERROR keeps the connection open by sending without end",
    ),
    # --- revocation and the failed-AUTH limiter around a lookup that waits ----------------------
    mutant(
        "lookup-in-flight-not-repeated",
        "src/hpfeeds3/broker/state.py",
        "                    if generation == self.auth_generation:\n                        return key",
        "                    return key",
        "tests/broker/test_revocation_in_flight.py",
        why="a key removed while a sensor's AUTH was being looked up (PostgreSQL) still logs it in",
    ),
    mutant(
        "lookup-later-skips-the-limiter",
        "src/hpfeeds3/broker/keylookup.py",
        "if conn.session.state != AUTHING or _rate_limited(conn, ident):",
        "if conn.session.state != AUTHING:",
        "tests/keys/test_broker_e2e.py::test_guesses_whose_postgresql_lookup_ends_after_the_block_are_refused_unverified",
        why="a guesser blocked while its AUTH was looked up (PostgreSQL) still has its guess verified",
    ),
    # --- console activity history ------------------------------------------------------------
    mutant(
        "activity-ring-slot-never-reset",
        ACTIVITY,
        "        if self.minutes[i] != minute:\n            self.minutes[i] = minute\n            self.counts[i] = 0\n",
        "        self.minutes[i] = minute\n",
        "tests/console/test_bounds.py::test_a_minute_a_day_later_starts_from_nothing_in_its_slot",
        why="a sensor's messages of yesterday's same minute are counted again in today's charts",
    ),
    mutant(
        "activity-old-minutes-kept-on-disk",
        ACTIVITY,
        '                cur.execute("DELETE FROM minutes WHERE minute < ?", (batch.oldest_minute,))\n',
        "",
        "tests/console/test_bounds.py::test_the_history_file_keeps_a_day_of_minutes_and_forgets_before_it_remembers",
        why="the console's history file grows by every minute of every sensor, forever",
    ),
    Mutant(
        "activity-forgets-after-remembering",
        ACTIVITY,
        (
            (_FORGET_IDENTS, ""),
            (_REMEMBER_PAIRS, _REMEMBER_PAIRS + _FORGET_IDENTS),
        ),
        ("tests/console/test_bounds.py::test_the_history_file_keeps_a_day_of_minutes_and_forgets_before_it_remembers",),
        why="a sensor dropped from the history and seen again before the next write is gone after a restart",
    ),
    Mutant(
        "chain-unavailable-as-unknown",
        "src/hpfeeds3/broker/auth/chain.py",
        (
            (
                "        if unavailable is not None:\n            raise unavailable\n"
                "        return None\n\n    def lookup_now",
                "        return None\n\n    def lookup_now",
            ),
        ),
        (
            "tests/broker/test_auth_backends.py",
            "tests/keys/test_broker_e2e.py::test_chain_with_postgresql_down_serves_the_idents_sqlite_knows",
        ),
        why="while PostgreSQL is down, its sensors are told their secret is wrong and the limiter blocks them",
    ),
    mutant(
        "heldback-unbounded",
        "src/hpfeeds3/broker/heldback.py",
        "        if len(self.data) > conn._authing_buffer_cap():",
        "        if False:",
        "tests/reliability/test_held_back.py",
        why="a client held back from a full pre-auth pool makes the broker keep whatever it sends at once",
    ),
    mutant(
        "heldback-bytes-dropped",
        "src/hpfeeds3/broker/connection.py",
        "            if holding is not None and holding.data:\n                self.data_received(holding.data)",
        "            pass",
        "tests/reliability/test_held_back.py",
        why="a TLS sensor held back in a storm loses the ClientHello it sent with its connect: its handshake stalls",
    ),
    mutant(
        "workers-get-the-whole-host-limit",
        "src/hpfeeds3/broker/supervisor.py",
        "        out += [flag, str(-(-value // workers))]",
        "        out += [flag, str(value)]",
        "tests/cluster/test_workers.py",
        why="with --workers N the host takes N times --max-connections (and every host-wide limit)",
    ),
    mutant(
        "dead-worker-not-restarted",
        "src/hpfeeds3/broker/supervisor.py",
        "                self.restart_at[i] = now + RESTART_DELAY_S",
        "                pass",
        "tests/cluster/test_workers_supervision.py::test_a_dead_worker_is_restarted",
        why="a worker that crashes is gone for good: its share of the port serves nobody",
    ),
    # --- credentials kept out of logs and /healthz -----------------------------------------------
    mutant(
        "redact-password-split-at-first-at",
        REDACT,
        '        userinfo, at, hostport = netloc.rpartition("@")\n        if at:\n            user, colon',
        '        userinfo, at, hostport = netloc.partition("@")\n        if at:\n            user, colon',
        "tests/broker/test_redact.py",
        why="a PostgreSQL password holding an @ reaches the log in part",
    ),
    mutant(
        "redact-nats-token-kept",
        REDACT,
        "            elif parts.scheme.lower() in TOKEN_USERINFO_SCHEMES:\n"
        '                netloc = f"{MASK}@{hostport}"\n',
        "",
        "tests/broker/test_redact.py",
        why="a NATS token given as nats://TOKEN@host is logged as it is",
    ),
    mutant(
        "redact-malformed-url-kept",
        REDACT,
        '        return url.partition("://")[0] + "://" + MASK',
        "        return url",
        "tests/broker/test_redact.py",
        why="a DSN that urllib cannot split reaches the log with its password",
    ),
    mutant(
        "scrub-decoded-secret-kept",
        REDACT,
        "    found += [urllib.parse.unquote(v) for v in found]\n",
        "",
        "tests/broker/test_redact.py",
        why="a driver error that echoes the percent-decoded password shows it",
    ),
    # --- key stores and tools -------------------------------------------------------------
    mutant(
        "sqlite-durable-never-turned-off",
        SQLITE_STORE,
        '        elif has_table(db, "durable_keys"):\n'
        '            db.execute("delete from durable_keys where ident = ?", (key.ident,))\n',
        "",
        "tests/keys/test_durable_keys.py::test_add_durable_then_turn_it_off_and_on_in_every_store",
        why="keys update --no-durable leaves a sqlite key durable: its log keeps growing",
    ),
    mutant(
        "sqlite-durable-table-unseen-until-restart",
        SQLITE_STORE,
        "                self._refresh_lookup_sql()  # keys may have made durable_keys (or SQL dropped it)\n",
        "",
        "tests/keys/test_durable_keys.py::test_sqlite_reader_sees_the_flag_and_its_change_feed_reports_it",
        why="the first key made durable in a running broker's sqlite store is served live only until a restart",
    ),
    mutant(
        "json-store-drops-keys-on-broken-file",
        "src/hpfeeds3/broker/auth/jsonfile.py",
        "self.path, e)\n            return set()",
        "self.path, e)\n            self._keys = {}\n            return set()",
        "tests/broker/test_auth_backends.py",
        why="a JSON key file saved half-written locks every sensor out",
    ),
    mutant(
        "bench-storm-always-skipped",
        "src/hpfeeds3/bench/storm.py",
        "    if resume and not target.tls:",
        "    if not target.tls:",
        "tests/bench/test_smoke.py::test_storm_keys_are_written_into_the_broker_s_sqlite_store",
        why="hpfeeds-bench skips every storm over plain TCP",
    ),
)
