"""hpfeeds-bench --smoke against real brokers: every scenario runs and nothing is lost.

Correctness only; no timing is asserted (figures come from benchmarks/compare).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hpfeeds3.bench.cli import SCENARIOS, SMOKE_SENSORS
from hpfeeds3.bench.credentials import bench_channels, bench_key, storm_keys, write_json, write_sqlite
from tests.support.broker import BrokerProcess, free_port, http_get, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
BENCH_USERS = {"bench": bench_key("bench", "bench", bench_channels()), **storm_keys(SMOKE_SENSORS)}


def run_smoke(port: int, *extra: str, scenarios: tuple[str, ...] = ()) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "hpfeeds3.bench.cli", "--smoke", "--json-only", "--port", str(port), *extra, *scenarios],
        capture_output=True,
        text=True,
        timeout=90,
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout + done.stderr
    expected = [s.name for s in SCENARIOS if not scenarios or s.name in scenarios or s.group in scenarios]
    assert [r["scenario"] for r in records] == expected
    for r in records:
        assert r["ok"], r
        assert r.get("lost", 0) == 0, r
        if r["scenario"].startswith("storm") and "skipped" not in r:
            assert r["served"] == r["sensors"] == SMOKE_SENSORS and r["failed"] == 0, r
    return records


@pytest.fixture
def ceiling(tmp_path: Path):
    port = free_port()
    with open(tmp_path / "ceiling.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "ceiling.py"), "--bind", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=15, proc=proc)
            yield port, proc.pid
        finally:
            proc.terminate()
            proc.wait(10)


def test_smoke_against_the_ceiling_loses_nothing(ceiling: tuple[int, int]) -> None:
    port, pid = ceiling
    records = run_smoke(port, "--broker-pid", str(pid))
    idle = next(r for r in records if r["scenario"] == "idle")
    assert idle["kib_per_connection"] is not None


def test_smoke_against_our_broker_loses_nothing(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker(users=BENCH_USERS)
    run_smoke(broker.port, "--broker-pid", str(broker.proc.pid))


def _replayed(exporter: int, ident: str) -> float | None:
    """``hpfeeds_durable_replayed_total`` of ``ident``: messages the broker sent it from the log."""
    _, body = http_get(f"http://127.0.0.1:{exporter}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f'hpfeeds_durable_replayed_total{{ident="{ident}"}} '):
            return float(line.split()[-1])
    return None


def test_pubsub_with_a_durable_key_as_the_bench_s_subscriber(
    start_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """``--sub-ident``: the bench's subscriber is the durable key given, fed from the log,
    and the bench verified every message it was sent."""
    users = {**BENCH_USERS, "dur": {**bench_key("dur", "dur-secret", ["bench"]), "durable": True}}
    (tmp_path / "keys.json").write_text(json.dumps(users))
    exporter = free_port()
    broker = start_broker("--auth", "keys.json", "--data-dir", "data", "--exporter", f"127.0.0.1:{exporter}")
    run_smoke(broker.port, scenarios=("pubsub-100",))
    assert not _replayed(exporter, "dur")  # the bench's own key: the durable one never connected
    (record,) = run_smoke(broker.port, "--sub-ident", "dur", "--sub-secret", "dur-secret", scenarios=("pubsub-100",))
    replayed = _replayed(exporter, "dur")
    assert record["delivered"] > 0 and replayed is not None and replayed >= record["delivered"], (record, replayed)
    bench = [sys.executable, "-m", "hpfeeds3.bench.cli", "--smoke", "--json-only", "--port", str(broker.port)]
    # The secret defaults to the ident: refused.
    wrong = subprocess.run([*bench, "--sub-ident", "dur", "pubsub-100"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "ERROR" in json.loads(wrong.stdout.splitlines()[0])["error"], wrong.stdout


def test_a_broker_that_drops_a_message_fails_the_run(tmp_path: Path) -> None:
    """A forwarder that loses one message in the middle of the stream must fail pubsub."""
    port = free_port()
    script = tmp_path / "lossy.py"
    script.write_text(
        (ROOT / "benchmarks" / "ceiling.py").read_text() + "\n\n_orig = Forwarder.forward\n_seen = [0]\n\n"
        "def _lossy(channel, frames):\n"
        "    _seen[0] += 1\n"
        "    if _seen[0] == 50 and len(frames) > 300:\n"
        "        frames = frames[: len(frames) // 2 - 150] + frames[len(frames) // 2 - 150 + 118 :]\n"
        "    _orig(channel, frames)\n\n"
        "Forwarder.forward = staticmethod(_lossy)\n"
        "main()\n"
    )
    text = script.read_text().replace('if __name__ == "__main__":\n    main()\n', "")
    script.write_text(text)
    proc = subprocess.Popen([sys.executable, str(script), "--bind", f"127.0.0.1:{port}"])
    try:
        wait_for_port(port, timeout=15, proc=proc)
        done = subprocess.run(
            [sys.executable, "-m", "hpfeeds3.bench.cli", "--smoke", "--json-only", "--port", str(port), "pubsub-100"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proc.terminate()
        proc.wait(10)
    assert done.returncode == 1
    record = json.loads(done.stdout.splitlines()[0])
    assert not record["ok"]
    assert "lost" in record["error"] or "corrupted" in record["error"], record["error"]


def test_storm_over_tls_resumes_every_session(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    broker = start_broker("--tlscert", "cert.pem", "--tlskey", "key.pem", users=BENCH_USERS)
    ca_file = str(tmp_path / "ca.pem")
    records = run_smoke(broker.port, "--broker-pid", str(broker.proc.pid), "--tls-ca", ca_file, scenarios=("storm",))
    resumed = next(r for r in records if r["scenario"] == "storm-resumed")
    assert resumed["tls"] and resumed["resumed"] == SMOKE_SENSORS, resumed


def test_storm_keys_are_written_into_the_broker_s_sqlite_store(
    start_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    write_sqlite(str(tmp_path / "sqlite.db"))
    broker = start_broker("--auth", "sqlite", users=None)
    records = run_smoke(broker.port, "--storm-keys", str(tmp_path / "sqlite.db"), scenarios=("storm",))
    # Over plain TCP only the resumed storm is skipped: the other two ran on the keys written.
    served = {r["scenario"]: r["served"] for r in records if "skipped" not in r}
    assert served == {"storm": SMOKE_SENSORS, "storm-shared": SMOKE_SENSORS}, records
    idents = {row[0] for row in sqlite3.connect(tmp_path / "sqlite.db").execute("select ident from authkeys")}
    assert {"bench", "storm", "storm-0", f"storm-{SMOKE_SENSORS - 1}"} <= idents


def test_credentials_helpers_write_the_reference_formats(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    write_json(str(path))
    users = json.loads(path.read_text())
    assert users["bench"]["secret"] == "bench"
    assert "bench-49" in users["bench"]["pubchans"] and "bench" in users["bench"]["subchans"]
    db = tmp_path / "sqlite.db"
    write_sqlite(str(db))
    write_sqlite(str(db))  # idempotent
    rows = sqlite3.connect(db).execute("select owner, ident, secret, pubchans from authkeys").fetchall()
    assert len(rows) == 1 and rows[0][:3] == ("bench", "bench", "bench")
    assert json.loads(rows[0][3])[0] == "bench"
