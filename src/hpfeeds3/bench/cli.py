"""hpfeeds-bench: throughput, latency, handshakes and memory of an hpfeeds broker.

The broker under test needs one access key (write it with ``--write-json`` or
``--write-sqlite``)::

    ident  bench        secret  bench
    pubchans = subchans = bench, bench-0 .. bench-49

and, for the storm scenarios, one key per sensor and a shared one (written by
the same options, for ``--sensors`` sensors; or by the storm itself into the
broker's sqlite store with ``--storm-keys``): see ``credentials.py``.
``--sub-ident`` makes the first subscriber of the message scenarios another
key (a durable one, say), which must publish and subscribe on the channel.

Each scenario prints one JSON line; a markdown table of all follows. Any lost,
duplicated, reordered or corrupted message, refused handshake or broker ERROR
fails its scenario, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .credentials import bench_channels, write_json, write_sqlite, write_storm_json, write_storm_sqlite
from .flow import run_latency, run_throughput
from .handshake import find_listener_pid, raise_open_files_limit, run_connect, run_idle
from .proc import process_tree, tree_cpu_seconds
from .storm import run_storm
from .trickle import run_trickle
from .wire import TLS_VERSIONS, BenchError, Target

CONNECT_CONCURRENCY = 50
FANOUT_SUBSCRIBERS = 10
FANIN_PUBLISHERS = 50
SMOKE_SENSORS = 50


@dataclass(frozen=True, slots=True)
class Settings:
    duration: float
    warmup: float
    idle_connections: int
    broker_pid: int | None
    smoke: bool
    sensors: int = 10_000
    storm_keys: str | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    group: str
    summary: str
    figure: str  # the key of the headline number
    unit: str
    run: Callable[[Target, Settings], dict[str, Any]]


def _throughput(publishers: int, subscribers: int, payload: int) -> Callable[[Target, Settings], dict[str, Any]]:
    def run(target: Target, s: Settings) -> dict[str, Any]:
        return run_throughput(
            target,
            publishers=publishers,
            subscribers=subscribers,
            payload=payload,
            duration=s.duration,
            warmup=s.warmup,
        )

    return run


def _latency(rate: float) -> Callable[[Target, Settings], dict[str, Any]]:
    def run(target: Target, s: Settings) -> dict[str, Any]:
        return run_latency(target, rate=rate, payload=100, duration=s.duration, warmup=s.warmup)

    return run


def _connect(concurrency: int) -> Callable[[Target, Settings], dict[str, Any]]:
    def run(target: Target, s: Settings) -> dict[str, Any]:
        return run_connect(target, concurrency=concurrency, duration=s.duration)

    return run


def _idle(target: Target, s: Settings) -> dict[str, Any]:
    return run_idle(target, connections=s.idle_connections, broker_pid=s.broker_pid, settle=0.1 if s.smoke else 1.0)


def _trickle(target: Target, s: Settings) -> dict[str, Any]:
    return run_trickle(target, broker_pid=s.broker_pid, smoke=s.smoke)


def _storm(shared: bool, resume: bool = False) -> Callable[[Target, Settings], dict[str, Any]]:
    def run(target: Target, s: Settings) -> dict[str, Any]:
        return run_storm(
            target,
            sensors=s.sensors,
            shared=shared,
            broker_pid=s.broker_pid,
            resume=resume,
            keys_sqlite=s.storm_keys,
        )

    return run


# In the order they run: idle first, so that buffers freed by the other
# scenarios cannot hide the memory that idle connections cost.
SCENARIOS = [
    Scenario("idle", "idle", "RSS per authenticated, subscribed, idle connection", "kib_per_connection", "KiB", _idle),
    Scenario("connect-seq", "connect", "handshakes/s, one at a time", "handshakes_per_s", "hs/s", _connect(1)),
    Scenario(
        "connect-50",
        "connect",
        f"handshakes/s, {CONNECT_CONCURRENCY} at once",
        "handshakes_per_s",
        "hs/s",
        _connect(CONNECT_CONCURRENCY),
    ),
    Scenario("latency-5k", "latency", "p99 at 5,000 msg/s, 100 B", "p99_ms", "ms", _latency(5000)),
    Scenario("latency-20k", "latency", "p99 at 20,000 msg/s, 100 B", "p99_ms", "ms", _latency(20000)),
    Scenario("pubsub-100", "pubsub", "1 → 1, 100 B payloads", "msgs_per_s", "msg/s", _throughput(1, 1, 100)),
    Scenario("pubsub-4k", "pubsub", "1 → 1, 4 KiB payloads", "msgs_per_s", "msg/s", _throughput(1, 1, 4096)),
    Scenario(
        "fanout",
        "fanout",
        f"1 → {FANOUT_SUBSCRIBERS}, 100 B, deliveries/s",
        "deliveries_per_s",
        "deliveries/s",
        _throughput(1, FANOUT_SUBSCRIBERS, 100),
    ),
    Scenario(
        "fanin",
        "fanin",
        f"{FANIN_PUBLISHERS} → 1, 100 B",
        "msgs_per_s",
        "msg/s",
        _throughput(FANIN_PUBLISHERS, 1, 100),
    ),
    Scenario(
        "trickle",
        "trickle",
        "1 MiB frames in 128 B / 1,448 B writes: broker CPU per MiB vs 64 KiB writes (worst ratio)",
        "worst_ratio",
        "ratio",
        _trickle,
    ),
    Scenario(
        "storm", "storm", "N sensors at once, each its own key: s until all served", "storm_s", "s", _storm(False)
    ),
    Scenario(
        "storm-shared", "storm", "N sensors at once, one shared key: s until all served", "storm_s", "s", _storm(True)
    ),
    Scenario(
        "storm-resumed",
        "storm",
        "N sensors at once, own keys, resuming their TLS sessions (--tls only)",
        "storm_s",
        "s",
        _storm(False, resume=True),
    ),
]
BY_NAME = {s.name: s for s in SCENARIOS}
GROUPS = sorted({s.group for s in SCENARIOS})


def select(names: list[str]) -> list[Scenario]:
    """Scenario names or group names (``pubsub`` = both payload sizes), in run order."""
    if not names or names == ["all"]:
        return list(SCENARIOS)
    wanted = set()
    for n in names:
        hits = [s.name for s in SCENARIOS if n in (s.name, s.group)]
        if not hits:
            raise SystemExit(f"hpfeeds-bench: unknown scenario {n!r}; choose from {', '.join(GROUPS + list(BY_NAME))}")
        wanted.update(hits)
    return [s for s in SCENARIOS if s.name in wanted]


def headline(record: dict[str, Any]) -> str:
    if not record.get("ok"):
        return "FAILED"
    value = record.get("value")
    if value is None:
        return "n/a"
    return f"{value:,.3f}" if isinstance(value, float) and value < 100 else f"{value:,.0f}"


def _details(scenario: Scenario, record: dict[str, Any]) -> str:
    if not record.get("ok"):
        return str(record.get("error", ""))[:200]
    if scenario.group == "latency":
        return f"p50 {record['p50_ms']} ms, max {record['max_ms']} ms, {record['samples']:,} samples"
    if scenario.group in ("pubsub", "fanout", "fanin"):
        return f"{record['mb_per_s']} MB/s payload, {record['delivered']:,} delivered, 0 lost"
    if scenario.group == "connect":
        cpu = f", broker {record['broker_us_per_handshake']} µs each" if "broker_us_per_handshake" in record else ""
        return f"{record['handshakes']:,} handshakes{cpu}"
    if scenario.group == "storm":
        if "skipped" in record:
            return str(record["skipped"])
        text = (
            f"{record['served']:,}/{record['sensors']:,} served, {record['handshakes_per_s']:,} hs/s;"
            f" retried: {record['refused']} refused, {record['errors']} ERROR,"
            f" {record['connect_timeouts']} connect timeouts"
        )
        if "broker_us_per_handshake" in record:
            text += (
                f"; broker {record['broker_us_per_handshake']} µs/handshake"
                f" ({record['broker_us_per_connection']} with the close), peak RSS {record['rss_peak_mib']} MiB"
            )
        if "resumed" in record:
            text += f"; {record['resumed']:,} TLS sessions resumed"
        return text
    if scenario.group == "trickle":
        return ", ".join(f"{k[len('broker_cpu_ms_per_mib_') :]} {v} ms/MiB" for k, v in record.items() if "cpu_ms" in k)
    if scenario.group == "idle":
        if "rss_after_mib" in record:
            return (
                f"{record['connections']:,} connections, RSS {record['rss_before_mib']} → {record['rss_after_mib']} MiB"
            )
        return f"{record['connections']:,} connections (broker PID unknown: no RSS)"
    return ""


def markdown_table(scenarios: list[Scenario], records: list[dict[str, Any]]) -> str:
    lines = ["| scenario | result | unit | what | details |", "|---|---:|---|---|---|"]
    for s, r in zip(scenarios, records, strict=True):
        lines.append(f"| {s.name} | {headline(r)} | {s.unit} | {s.summary} | {_details(s, r)} |")
    return "\n".join(lines)


def _own_cpu_seconds() -> float:
    """CPU time of this process and its finished children (the load generator)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_one(scenario: Scenario, target: Target, settings: Settings) -> dict[str, Any]:
    """Run one scenario; besides its figures, report how busy the broker and the
    load generator were (a broker well below 100 % is not what limited the figure)."""
    started = time.monotonic()
    # the broker's process and its workers (--workers N: a supervisor and N processes)
    pids = process_tree(settings.broker_pid) if settings.broker_pid else []
    broker_cpu = tree_cpu_seconds(pids) if pids else None
    load_cpu = _own_cpu_seconds()
    try:
        result = scenario.run(target, settings)
    except BenchError as e:
        return {"scenario": scenario.name, "ok": False, "error": str(e)}
    except OSError as e:
        return {"scenario": scenario.name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    record = {"scenario": scenario.name, "ok": True, "value": result.get(scenario.figure), "unit": scenario.unit}
    record.update(result)
    wall = time.monotonic() - started
    record["wall_s"] = round(wall, 2)
    broker_after = tree_cpu_seconds(pids) if pids else None
    if broker_cpu is not None and broker_after is not None:
        record["broker_cpu_pct"] = round(100 * (broker_after - broker_cpu) / wall)
        handshakes = result.get("handshakes")
        if handshakes:  # connect: the broker's CPU per handshake, close included
            record["broker_us_per_handshake"] = round((broker_after - broker_cpu) / handshakes * 1e6)
    record["load_cpu_pct"] = round(100 * (_own_cpu_seconds() - load_cpu) / wall)
    return record


def _is_local(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpfeeds-bench",
        description=__doc__.split("\n\n")[0],
        epilog=f"Scenarios: {', '.join(s.name for s in SCENARIOS)}; groups: {', '.join(GROUPS)}. "
        "The broker must know the key: ident bench, secret bench, allowed to publish and subscribe on "
        "bench and bench-0 .. bench-49 (write it with --write-json or --write-sqlite); the storm scenarios "
        "need keys storm-0 .. storm-N-1 and storm (the same options write them, or --storm-keys).",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"hpfeeds-bench {__version__}")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="scenarios or groups to run (default: all)")
    p.add_argument("--host", default="127.0.0.1", help="broker address (default %(default)s)")
    p.add_argument("--port", type=int, default=10000, help="broker port (default %(default)s)")
    p.add_argument(
        "--sub-port",
        type=int,
        default=None,
        help="subscribers connect here instead: another node of a cluster, for cross-node figures",
    )
    p.add_argument("--ident", default="bench", help="ident to authenticate as (default %(default)s)")
    p.add_argument("--secret", default="bench", help="its secret (default %(default)s)")
    p.add_argument(
        "--sub-ident",
        metavar="IDENT",
        help="the first subscriber of the message scenarios (the one of pubsub, fanin, latency and trickle;"
        " subscriber 0 of fanout) authenticates as IDENT instead, e.g. a durable key; it must publish"
        " and subscribe on the channel (default: --ident)",
    )
    p.add_argument("--sub-secret", metavar="SECRET", help="its secret (default: IDENT itself)")
    p.add_argument(
        "--channel",
        default="bench",
        help="channel; the connect scenario also uses CHANNEL-0..CHANNEL-49 (default %(default)s)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per scenario (default %(default)s)")
    p.add_argument("--warmup", type=float, default=None, help="seconds not measured (default: duration / 10)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--tls-ca", metavar="PEM", help="CA to verify the broker with (default: no verification)")
    p.add_argument(
        "--tls-version",
        choices=sorted(TLS_VERSIONS),
        help="offer this TLS version only (default: the highest both sides speak, 1.3)",
    )
    p.add_argument("--broker-pid", type=int, help="broker PID, for idle and CPU figures (default: found in /proc)")
    p.add_argument("--idle-connections", type=int, default=10000, help="connections in idle (default %(default)s)")
    p.add_argument("--sensors", type=int, default=10000, help="sensors in the storm scenarios (default %(default)s)")
    p.add_argument(
        "--storm-keys",
        metavar="SQLITE",
        help="the broker's sqlite auth store: the storm writes its keys there first (when missing)",
    )
    p.add_argument("--smoke", action="store_true", help="every scenario for a fraction of a second: correctness only")
    p.add_argument("--json-only", action="store_true", help="print the JSON lines, not the table")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument(
        "--write-json", metavar="PATH", help="write a users.json with the benchmark and storm keys, and exit"
    )
    p.add_argument(
        "--write-sqlite", metavar="PATH", help="add the benchmark and storm keys to an sqlite auth DB, and exit"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sub_secret is not None and args.sub_ident is None:
        parser.error("--sub-secret needs --sub-ident")
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:12} {s.group:8} {s.summary}")
        return 0
    if args.write_json or args.write_sqlite:
        channels = bench_channels(args.channel)
        if args.write_json:
            write_json(args.write_json, args.ident, args.secret, channels)
            write_storm_json(args.write_json, args.sensors)
        if args.write_sqlite:
            write_sqlite(args.write_sqlite, args.ident, args.secret, channels)
            write_storm_sqlite(args.write_sqlite, args.sensors)
        return 0
    scenarios = select(args.scenarios)
    duration = 0.3 if args.smoke else args.duration
    settings = Settings(
        duration=duration,
        warmup=args.warmup if args.warmup is not None else (0.0 if args.smoke else duration / 10),
        idle_connections=min(args.idle_connections, 50) if args.smoke else args.idle_connections,
        broker_pid=args.broker_pid or (find_listener_pid(args.port) if _is_local(args.host) else None),
        smoke=args.smoke,
        sensors=min(args.sensors, SMOKE_SENSORS) if args.smoke else args.sensors,
        storm_keys=args.storm_keys,
    )
    target = Target(
        host=args.host,
        port=args.port,
        ident=args.ident.encode(),
        secret=args.secret.encode(),
        channel=args.channel.encode(),
        tls=args.tls or bool(args.tls_ca) or bool(args.tls_version),
        tls_ca=args.tls_ca,
        tls_version=args.tls_version,
        sub_port=args.sub_port,
        sub_ident=args.sub_ident.encode() if args.sub_ident is not None else None,
        sub_secret=args.sub_secret.encode() if args.sub_secret is not None else None,
    )
    raise_open_files_limit()
    records = []
    for s in scenarios:
        record = run_one(s, target, settings)
        records.append(record)
        print(json.dumps(record), flush=True)
    if not args.json_only:
        print()
        print(markdown_table(scenarios, records))
    failed = [r["scenario"] for r in records if not r["ok"]]
    if failed:
        print(f"hpfeeds-bench: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
