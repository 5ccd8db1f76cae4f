"""Ingestion under faults: a daemon SIGKILLed again and again while a producer streams, a
60-second broker outage, a locked database, and a 100k-event burst."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml
from services import wait_until

from demo.broker import EmbeddedBroker, free_port, produce_events
from feedback.config import KafkaConfig
from feedback.consumer import FeedbackConsumer
from feedback.store import FeedbackStore


def event(i: int, prefix: str = "s") -> bytes:
    return json.dumps(
        {
            "schema_version": 1,
            "event_id": f"{prefix}{i}",
            "type": "rating",
            "occurred_at": "2026-11-20T10:00:00Z",
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "completion": f"a{i}",
            "rating": "up",
        }
    ).encode()


READ_TOKEN = "ingest-faults-read-token"
AUTH = {"authorization": f"Bearer {READ_TOKEN}"}


SESSION_TIMEOUT_MS, RETRY_BACKOFF_MAX_S = 6000, 2.0


def serve_config(tmp_path: Path, bootstrap: str, port: int, db: Path) -> Path:
    path = tmp_path / "alignd.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "session_timeout_ms": SESSION_TIMEOUT_MS,
                    "heartbeat_interval_ms": 1000,
                    "max_poll_records": 200,
                    "retry_backoff_max_s": RETRY_BACKOFF_MAX_S,
                },
                "store": {"url": f"sqlite:///{db}"},
                "paths": {"data_dir": str(tmp_path / "data")},
                "schedule": {
                    "cron": None,
                    "min_new_pairs": None,
                    "min_new_ratings": None,
                    "drift_probe_cron": None,
                },
                "admin": {"port": port, "read_token": READ_TOKEN},
            }
        )
    )
    return path


def start_daemon(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )


def consumer_lag(url: str) -> dict[str, int] | None:
    """The daemon's consumer lag per partition, or None while it is not listening yet."""
    try:
        lag = httpx.get(f"{url}/v1/status", headers=AUTH, timeout=5).json()["consumer"]["lag"]
    except httpx.TransportError:
        return None
    return {str(k): v for k, v in lag.items()}


def test_daemon_sigkilled_five_times_while_a_producer_streams_20k_events(
    child_processes: None, tmp_path: Path, fault_figures
) -> None:
    n, rng = 20_000, random.Random(1)
    values = [event(i) for i in range(n)]
    duplicates = [values[rng.randrange(n)] for _ in range(500)]  # the producer's own redeliveries
    invalid = [b"{not json" for _ in range(300)]
    stream = values + duplicates + invalid
    rng.shuffle(stream)
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        db, port = tmp_path / "f.db", free_port()
        config = serve_config(tmp_path, broker.bootstrap, port, db)
        producer = threading.Thread(
            target=lambda: [
                produce_events(broker.bootstrap, "alignd.feedback", stream[i : i + 1000])
                or time.sleep(0.3)
                for i in range(0, len(stream), 1000)
            ]
        )
        producer.start()
        store = FeedbackStore(f"sqlite:///{db}")
        kills = 0
        while kills < 5:
            daemon = start_daemon(config)
            time.sleep(rng.uniform(4, 9))  # a random moment: joining, mid-batch, or idle
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            kills += 1
        producer.join()
        daemon = start_daemon(config)
        try:
            assert wait_until(lambda: store.count() == n, 180), store.count()
            url = f"http://127.0.0.1:{port}"
            # the store may be complete before this restarted daemon listens: refused = not yet
            assert wait_until(lambda: consumer_lag(url) in ({}, {"0": 0, "1": 0}), 60)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        # every valid event exactly once (the store is unique on event_id; check the ids)
        assert {s.event.event_id for s in store.iter_events()} == {f"s{i}" for i in range(n)}
        # and the counts add up: every message produced was stored, a duplicate, or dead-lettered
        from kafka import KafkaConsumer

        reader = KafkaConsumer(
            "alignd.feedback.dlq",
            bootstrap_servers=broker.bootstrap,
            group_id="dlq-check",
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )
        sources: set[str] = set()
        deadline = time.monotonic() + 30
        while len(sources) < len(invalid) and time.monotonic() < deadline:
            for records in reader.poll(timeout_ms=1000).values():
                for r in records:
                    h = dict(r.headers)
                    sources.add(
                        h["alignd-source-partition"].decode()
                        + "/"
                        + h["alignd-source-offset"].decode()
                    )
        reader.close()
        assert len(sources) == len(invalid)
        assert store.count() + len(duplicates) + len(sources) == len(stream)
        fault_figures(
            "daemon SIGKILLed 5× during a 20k stream",
            produced=len(stream),
            stored=store.count(),
            duplicates=len(stream) - store.count() - len(sources),
            dead_lettered=len(sources),
        )
        store.close()


# The outage outlasts, three times over, every clock the daemon's consumer runs on during it
# (serve_config: the group session, the back-off cap; the consumer's broker ping every 5 s), so
# it crosses the same states a minute would: noticed, backed off to the cap, session expired,
# retried at the cap again and again. Configuration shortens it, not a weaker check.
OUTAGE_S = 3 * max(SESSION_TIMEOUT_MS / 1000, RETRY_BACKOFF_MAX_S, 5.0)


def test_broker_outage_longer_than_every_timeout_daemon_stays_up(
    child_processes: None, tmp_path: Path, fault_figures
) -> None:
    broker = EmbeddedBroker().start()
    daemon = None
    try:
        broker.create_topics("alignd.feedback")
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        daemon = start_daemon(serve_config(tmp_path, broker.bootstrap, port, tmp_path / "f.db"))
        url = f"http://127.0.0.1:{port}"

        def code(path: str) -> int:
            try:
                return httpx.get(url + path, timeout=3).status_code
            except httpx.HTTPError:
                return 0

        produce_events(broker.bootstrap, "alignd.feedback", [event(i, "a") for i in range(50)])
        assert wait_until(lambda: code("/readyz") == 200, 60)
        broker.stop()
        outage_end = time.monotonic() + OUTAGE_S
        assert wait_until(lambda: code("/readyz") == 503, 30)
        while time.monotonic() < outage_end:  # the whole outage: alive, never ready
            assert code("/healthz") == 200 and code("/readyz") == 503
            assert daemon.poll() is None
            time.sleep(2)
        broker.start()  # memory storage: the new broker is empty, so re-produce what we need
        broker.create_topics("alignd.feedback")
        broker.create_topics("alignd.feedback.dlq")
        produce_events(broker.bootstrap, "alignd.feedback", [event(i, "b") for i in range(50)])
        assert wait_until(lambda: code("/readyz") == 200, 90)
        assert wait_until(
            lambda: (
                httpx.get(f"{url}/v1/status", headers=AUTH, timeout=5).json()["store"]["last_seq"]
                == 100
            ),
            60,
        )
        fault_figures(
            f"broker down {OUTAGE_S:.0f} s (fresh broker after)",
            produced=100,
            stored=httpx.get(f"{url}/v1/status", headers=AUTH, timeout=5).json()["store"][
                "last_seq"
            ],
            daemon_restarts=0,
        )
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        broker.stop()


def test_locked_database_commits_nothing_then_catches_up(
    child_processes: None, tmp_path: Path, fault_figures
) -> None:
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback")
        broker.create_topics("alignd.feedback.dlq")
        db = tmp_path / "f.db"
        store = FeedbackStore(f"sqlite:///{db}")
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        produce_events(broker.bootstrap, "alignd.feedback", [event(i) for i in range(30)])
        consumer = FeedbackConsumer(
            KafkaConfig(
                bootstrap_servers=broker.bootstrap,
                group_id="lock",
                session_timeout_ms=6000,
                heartbeat_interval_ms=1000,
                retry_backoff_max_s=1,
            ),
            store,
            ping_interval_s=0.5,
        )
        stop = threading.Event()
        thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        thread.start()
        assert wait_until(lambda: consumer.totals.failures >= 1, 60)
        assert not consumer.ready and "locked" in (consumer.last_error or "")
        locker.execute("ROLLBACK")
        locker.close()
        assert wait_until(lambda: store.count() == 30, 60)
        assert wait_until(lambda: consumer.ready, 30)
        stop.set()
        thread.join(30)
        consumer.close()
        fault_figures(
            "SQLite locked by another process",
            produced=30,
            stored=store.count(),
            duplicates=consumer.totals.duplicates,
            failed_writes_retried=consumer.totals.failures,
        )
        store.close()


def test_burst_of_100k_events_keeps_memory_bounded(
    child_processes: None, tmp_path: Path, fault_figures
) -> None:
    """Batches are bounded by max_poll_records: memory after 100k events ≈ memory after 20k."""
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        payload = "x" * 800  # ~1 KB events, like production
        values = [
            json.dumps(
                {
                    "schema_version": 1,
                    "event_id": f"m{i}",
                    "type": "rating",
                    "occurred_at": "2026-11-20T10:00:00Z",
                    "prompt": [{"role": "user", "content": f"q{i} {payload}"}],
                    "completion": "a",
                    "rating": "down",
                }
            ).encode()
            for i in range(100_000)
        ]
        produce_events(broker.bootstrap, "alignd.feedback", values)
        del values
        env = os.environ | {
            "ALIGND_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "ALIGND_STORE__URL": f"sqlite:///{tmp_path / 'f.db'}",
            "ALIGND_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "ALIGND_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "ingest", "--until-idle", "3"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
        samples: list[tuple[int, int]] = []
        while proc.poll() is None:
            try:
                rss = int(
                    Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]
                )  # kB
                samples.append((store.count(), rss))
            except (FileNotFoundError, IndexError):
                pass
            time.sleep(0.5)
        assert proc.returncode == 0
        assert store.count() == 100_000
        early = max(rss for n, rss in samples if 10_000 <= n <= 30_000)
        late = max(rss for n, rss in samples if n >= 80_000)
        assert late < early * 1.25 + 20_000, (early, late)  # no growth with the backlog
        assert late < 500_000  # kB
        fault_figures(
            "burst of 100k events",
            produced=100_000,
            stored=store.count(),
            rss_mb_at_10k_30k=early // 1024,
            rss_mb_after_80k=late // 1024,
        )
        store.close()
