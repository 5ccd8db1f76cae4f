"""The consumer against a real Kafka-protocol broker (Tansu): DLQ with reasons, SIGKILL
mid-stream and restart, broker outage, and a store that fails — nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from events_support import edit, encode, rating
from kafka import KafkaConsumer, TopicPartition
from services import wait_until
from sqlalchemy.exc import OperationalError

from demo.broker import EmbeddedBroker, produce_events
from feedback.config import KafkaConfig
from feedback.consumer import REASON_HEADER, FeedbackConsumer
from feedback.store import FeedbackStore

TOPIC, DLQ = "alignd.feedback", "alignd.feedback.dlq"


def kafka_config(broker: EmbeddedBroker, **kw: Any) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=broker.bootstrap, topic=TOPIC, dlq_topic=DLQ, group_id="alignd-test",
                       session_timeout_ms=6000, heartbeat_interval_ms=1000, retry_backoff_max_s=2.0, **kw)  # fmt: skip


def read_topic(
    broker: EmbeddedBroker, topic: str, expected: int, timeout_s: float = 30
) -> list[Any]:
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=f"reader-{time.time()}",
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)  # fmt: skip
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            out.extend(batch)
    consumer.close()
    return out


def committed(broker: EmbeddedBroker, partitions: int = 1) -> int:
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id="alignd-test", enable_auto_commit=False
    )
    total = sum(consumer.committed(TopicPartition(TOPIC, p)) or 0 for p in range(partitions))
    consumer.close()
    return total


def test_malformed_events_go_to_the_dlq_with_reasons_and_neighbours_are_stored(
    child_processes: None, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    broker.create_topics(TOPIC, partitions=2)
    broker.create_topics(DLQ)
    bad = {b'{"schema_version": 1,': "invalid_json", b"\xff\xfe": "invalid_utf8",
           encode(rating("x") | {"mood": 1}): "unknown_field", encode(edit("y", edited=" ")): "empty_text"}  # fmt: skip
    values = []
    for i, raw in enumerate(bad):
        values += [
            encode(rating(f"ok{2 * i}", prompt=f"q{i}")),
            raw,
            encode(edit(f"ok{2 * i + 1}", prompt=f"q{i}")),
        ]
    produce_events(broker.bootstrap, TOPIC, values)
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    consumer = FeedbackConsumer(kafka_config(broker), store)
    totals = consumer.run(threading.Event(), until_idle_s=2)
    consumer.close()

    assert totals.stored == 8 and store.count() == 8
    assert sum(totals.dead_lettered.values()) == 4
    dlq = read_topic(broker, DLQ, expected=4)
    assert len(dlq) == 4
    by_value = {r.value: dict(r.headers) for r in dlq}
    for raw, reason in bad.items():
        headers = by_value[raw]  # the original bytes, unchanged
        assert headers[REASON_HEADER].decode() == reason
        assert headers["alignd-source-topic"].decode() == TOPIC
        assert int(headers["alignd-source-offset"].decode()) >= 0
    assert committed(broker, partitions=2) == len(values)
    store.close()


def test_sigkill_mid_stream_then_restart_stores_every_event_exactly_once(
    child_processes: None, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    broker.create_topics(TOPIC, partitions=2)
    broker.create_topics(DLQ)
    n = 3000
    values = [encode(rating(f"r{i}", prompt=f"question {i}")) for i in range(n)]
    values += values[:200]  # a producer's own redelivery
    produce_events(broker.bootstrap, TOPIC, values)
    db = tmp_path / "f.db"
    env = os.environ | {
        "ALIGND_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap, "ALIGND_KAFKA__GROUP_ID": "alignd-test",
        "ALIGND_KAFKA__MAX_POLL_RECORDS": "10", "ALIGND_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "ALIGND_KAFKA__HEARTBEAT_INTERVAL_MS": "1000", "ALIGND_STORE__URL": f"sqlite:///{db}",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "daemon.cli", "ingest", "--until-idle", "3"]
    store = FeedbackStore(f"sqlite:///{db}")
    stored_at_kill = []
    for crash in range(3):  # three crashes at different points of the stream
        log = tmp_path / f"ingest-{crash}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        before = store.count()
        # some progress, then a kill at once (small polls, a tight watch: on an idle machine a
        # run stores thousands of events a second); unless an earlier run stored every event
        progressed = lambda before=before: store.count() >= min(before + 20, n)  # noqa: E731
        assert wait_until(progressed, 60, interval_s=0.02), (
            f"ingestion did not progress after crash {crash} (stored {store.count()}): "
            + log.read_text()[-3000:]
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stored_at_kill.append(store.count())
    assert sum(c < n for c in stored_at_kill) >= 2, (
        f"crashes should land mid-stream: {stored_at_kill}"
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert store.count() == n
    ids = {s.event.event_id for s in store.iter_events()}
    assert ids == {f"r{i}" for i in range(n)}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dead_lettered"] == {}
    store.close()


def test_broker_outage_does_not_stop_the_consumer(child_processes: None, tmp_path: Path) -> None:
    broker = EmbeddedBroker().start()
    try:
        broker.create_topics(TOPIC)
        broker.create_topics(DLQ)
        produce_events(
            broker.bootstrap, TOPIC, [encode(rating(f"a{i}", prompt=f"q{i}")) for i in range(20)]
        )
        store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
        consumer = FeedbackConsumer(kafka_config(broker), store, ping_interval_s=0.5)
        stop = threading.Event()
        thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        thread.start()
        assert wait_until(lambda: store.count() == 20 and consumer.ready, 30)

        broker.stop()
        assert wait_until(lambda: not consumer.ready, 30), "outage not noticed"
        time.sleep(3)
        assert thread.is_alive()

        broker.start()  # Tansu keeps data in memory: the restarted broker is empty
        broker.create_topics(TOPIC)
        broker.create_topics(DLQ)
        produce_events(
            broker.bootstrap, TOPIC, [encode(rating(f"b{i}", prompt=f"p{i}")) for i in range(10)]
        )
        assert wait_until(lambda: store.count() == 30, 60), store.count()
        assert wait_until(lambda: consumer.ready, 10)
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        consumer.close()
        store.close()
    finally:
        broker.stop()


def test_store_failure_commits_nothing_and_loses_nothing(
    child_processes: None, broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.create_topics(TOPIC)
    broker.create_topics(DLQ)
    produce_events(
        broker.bootstrap, TOPIC, [encode(rating(f"r{i}", prompt=f"q{i}")) for i in range(40)]
    )
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    real_write = store.write_batch
    failing = threading.Event()
    failing.set()

    def write_batch(items: Any, now: Any = None) -> Any:  # injected fault: the disk is full
        if failing.is_set():
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        return real_write(items, now)

    monkeypatch.setattr(store, "write_batch", write_batch)
    consumer = FeedbackConsumer(kafka_config(broker), store, ping_interval_s=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    assert wait_until(lambda: consumer.totals.failures >= 3, 30)
    assert not consumer.ready and "disk is full" in (consumer.last_error or "")
    assert committed(broker) == 0  # nothing committed for what could not be stored

    failing.clear()  # the disk has space again
    assert wait_until(lambda: store.count() == 40, 30)
    assert wait_until(lambda: committed(broker) == 40, 15)
    assert consumer.ready
    stop.set()
    thread.join(30)
    consumer.close()
    store.close()


def test_record_crcs_are_checked_in_c() -> None:
    """kafka-python verifies every record batch's CRC-32C; its pure-Python fallback costs most
    of a consumer's time (bench/ingest_throughput.py). The crc32c dependency must be in use."""
    from kafka.record import util

    assert util.crc32c_c is not None, "install the crc32c package (a dependency of alignd)"
    assert util.calc_crc32c(memoryview(b"123456789")) == 0xE3069283  # the standard check value


def test_signed_attribution_through_the_broker(
    child_processes: None, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Issue #31, finding 2: self-declared actor ids beat the gate's actor_share (one flood
    split over 8 ids was promoted). With agents required to sign, only events a desk key signed
    keep their agent; the rest count as the one unattributed actor and are counted."""
    from pydantic import SecretStr

    from feedback.attribution import AttributionConfig, Verifier, sign

    broker.create_topics(TOPIC)
    broker.create_topics(DLQ)
    old, new = b"desk-key-2026a-" + b"x" * 24, b"desk-key-2026b-" + b"y" * 24  # a rotation

    def agent(event_id: str, who: str) -> dict[str, Any]:
        return edit(event_id, prompt=f"q {event_id}", actor={"kind": "agent", "id": who})

    events = {
        "old-key": sign(agent("s1", "a-1"), "desk-a", old),
        "new-key": sign(agent("s2", "a-2"), "desk-b", new),
        "unsigned": agent("u1", "flood-1"),
        "forged": sign(agent("f1", "flood-2"), "desk-a", b"guessed-" + b"z" * 32),
        "unknown_key": sign(agent("k1", "flood-3"), "desk-z", new),
        "tampered": {**sign(agent("t1", "a-3"), "desk-a", old), "edited_completion": "Refund!"},
        "user": rating("r1", prompt="q r1", actor={"kind": "user", "id": "u-1"}),  # not required
    }
    produce_events(broker.bootstrap, TOPIC, [encode(e) for e in events.values()])
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    config = AttributionConfig(signed_kinds=("agent", "annotator"),
                               keys={"desk-a": SecretStr(old.decode()), "desk-b": SecretStr(new.decode())})  # fmt: skip
    reports: list[Any] = []
    consumer = FeedbackConsumer(kafka_config(broker), store, verifier=Verifier(config),
                                on_batch=reports.append)  # fmt: skip
    totals = consumer.run(threading.Event(), until_idle_s=2)
    consumer.close()

    assert totals.stored == len(events) and not totals.dead_lettered  # nothing lost
    actors = {s.event.event_id: s.event.actor for s in store.iter_events()}
    assert actors["s1"] and actors["s1"].id == "a-1" and actors["s2"] and actors["s2"].id == "a-2"
    assert actors["r1"] and actors["r1"].id == "u-1"
    assert [actors[e] for e in ("u1", "f1", "k1", "t1")] == [None] * 4
    unverified: Counter[tuple[str, str]] = Counter()
    for report in reports:
        unverified.update(report.unverified)
    assert unverified == {("agent", "unsigned"): 1, ("agent", "bad_signature"): 2,
                          ("agent", "unknown_key"): 1}  # fmt: skip
