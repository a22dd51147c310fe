"""``--workers N``: N broker processes on one machine, one port, one cluster.

Each worker is ``hpfeeds-broker`` itself with the same flags, bound with
SO_REUSEPORT (the kernel spreads new connections over the workers) and meshed
with the others through the ``--cluster`` NATS, so a client of any worker sees
every message. With ``--exporter HOST:PORT`` worker *i* serves its metrics on
``PORT + i``.

The supervisor restarts a worker that dies (after a short pause), and on
SIGTERM/SIGINT stops them all and exits 0. A worker that fails while starting
(bad flag, port in use) stops everything with that worker's exit status.

Limits keep the meaning they have for one process, for the whole host
(``HOST_WIDE_LIMITS``): connections, connections not yet authenticated,
failed AUTHs per address or ident, and the cluster outbox are divided over the
workers (rounded up, so the host takes at most the limit plus N - 1; 0 still
disables). Limits per connection (frame size, buffers, timeouts,
subscriptions, denials) apply to each connection as they are.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from .config import BrokerConfig, parse_host_port

log = logging.getLogger("hpfeeds3.broker.supervisor")

# A worker that exits this soon after its start failed to start at all.
STARTUP_GRACE_S = 3.0
# Pause before restarting a worker that died.
RESTART_DELAY_S = 1.0
# How often the supervisor looks at its workers.
POLL_S = 0.2


#: Tells worker i its index, so its log lines can say "worker i: ..."; the
#: environment rather than a flag, so its argv stays the parent's flags.
WORKER_ENV = "HPFEEDS3_WORKER"

# Limits meant for the whole host, divided over the workers: flag -> where the value is in BrokerConfig.
HOST_WIDE_LIMITS: tuple[tuple[str, str, str], ...] = (
    ("--max-connections", "limits", "max_connections"),
    ("--max-unauthenticated", "limits", "max_unauthenticated"),
    ("--cluster-outbox", "limits", "cluster_outbox_bytes"),
    ("--auth-fail-limit", "auth_limits", "per_ident"),
    ("--auth-fail-address-limit", "auth_limits", "per_address"),
)


def worker_limits(config: BrokerConfig, workers: int) -> list[str]:
    """Flags giving one worker its share of each host-wide limit (rounded up; 0 stays 0: disabled)."""
    out: list[str] = []
    for flag, group, field in HOST_WIDE_LIMITS:
        value = getattr(getattr(config, group), field)
        out += [flag, str(-(-value // workers))]
    return out


def worker_argv(argv: Sequence[str], index: int, exporter: str | None, limits: Sequence[str] = ()) -> list[str]:
    """The parent's flags minus ``--workers``, plus ``--reuse-port``, this worker's exporter port and
    its share of the host-wide limits (given last: they override the parent's)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--exporter"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--exporter=")):
            continue
        out.append(arg)
    out.append("--reuse-port")
    out += limits
    if exporter:
        host, port = parse_host_port(exporter, "--exporter")
        out += ["--exporter", f"[{host}]:{port + index}" if ":" in host else f"{host}:{port + index}"]
    return out


class Supervisor:
    def __init__(self, argv: Sequence[str], workers: int, exporter: str | None, config: BrokerConfig) -> None:
        self.argv = list(argv)
        self.limits = worker_limits(config, workers)
        self.count = workers
        self.exporter = exporter
        self.drain_s = config.limits.shutdown_drain_s
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.started_at = [0.0] * workers
        self.restart_at: list[float | None] = [None] * workers
        self.stopping = False

    def _spawn(self, i: int) -> None:
        cmd = [sys.executable, "-m", "hpfeeds3.broker.cli", *worker_argv(self.argv, i, self.exporter, self.limits)]
        self.procs[i] = subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: str(i)})
        self.started_at[i] = time.monotonic()
        self.restart_at[i] = None
        log.info("worker %d started (pid %d)", i, self.procs[i].pid)  # type: ignore[union-attr]

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "%d workers; host-wide limits divided over them, each worker: %s",
            self.count,
            " ".join(self.limits),
        )
        for i in range(self.count):
            self._spawn(i)
        status = 0
        while not self.stopping:
            time.sleep(POLL_S)
            if self.stopping:
                # Ctrl-C at a terminal, or a stop of the whole group (systemd's
                # default): the workers got the signal too and are exiting;
                # that is the stop, not deaths to restart.
                break
            now = time.monotonic()
            for i, proc in enumerate(self.procs):
                if proc is None:
                    if self.restart_at[i] is not None and now >= self.restart_at[i]:  # type: ignore[operator]
                        self._spawn(i)
                    continue
                code = proc.poll()
                if code is None:
                    continue
                self.procs[i] = None
                if now - self.started_at[i] < STARTUP_GRACE_S and code in (1, 2):
                    log.error("worker %d failed to start (exit %d); stopping", i, code)
                    status = code
                    self.stopping = True
                    break
                log.warning("worker %d exited with %s; restarting in %g s", i, code, RESTART_DELAY_S)
                self.restart_at[i] = now + RESTART_DELAY_S
        self._stop_all()
        return status

    def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_s + 5
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        log.info("all workers stopped")
