"""Hardening of ingestion, against the real broker (Tansu) and a real PostgreSQL: a producer
with each compression codec, a codec this process lacks, an event the database refuses, a
NUL byte in the envelope, and a rejected message with a 2 MB key. In each, one bad input never
stops the events after it."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import kafka.codec
import pytest
from kafka import KafkaConsumer, KafkaProducer
from services import wait_until
from sqlalchemy import text

from demo.broker import EmbeddedBroker, produce_events
from feedback.config import KafkaConfig
from feedback.consumer import REASON_HEADER, FeedbackConsumer
from feedback.store import FeedbackStore

TOPIC, DLQ = "alignd.feedback", "alignd.feedback.dlq"
CODECS = ("gzip", "snappy", "lz4", "zstd")


def event(event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": event_id,
        "type": "rating",
        "occurred_at": "2026-11-20T10:00:00Z",
        "prompt": [{"role": "user", "content": f"where is order {event_id}?"}],
        "completion": "It ships today.",
        "rating": "up",
        **extra,
    }


def encoded(events: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(e).encode() for e in events]


def config(broker: EmbeddedBroker, topic: str = TOPIC, **kw: Any) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=broker.bootstrap, topic=topic, dlq_topic=f"{topic}.dlq",
                       group_id=f"alignd-{topic}", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                       retry_backoff_max_s=1.0, **kw)  # fmt: skip


def drain(kafka: KafkaConfig, store: FeedbackStore, deadline_s: float = 90) -> FeedbackConsumer:
    """Consume until the topic is drained, or ``deadline_s`` (a stuck consumer never drains)."""
    consumer = FeedbackConsumer(kafka, store)
    stop = threading.Event()
    timer = threading.Timer(deadline_s, stop.set)
    timer.start()
    consumer.run(stop, until_idle_s=2)
    timer.cancel()
    consumer.close()
    return consumer


def dead_letters(broker: EmbeddedBroker, topic: str, expected: int) -> list[Any]:
    reader = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=f"dlq-{topic}",
                           auto_offset_reset="earliest", session_timeout_ms=6000,
                           heartbeat_interval_ms=1000, max_partition_fetch_bytes=5_000_000)  # fmt: skip
    out: list[Any] = []
    for _ in range(20):
        for batch in reader.poll(timeout_ms=1000).values():
            out.extend(batch)
        if len(out) >= expected:
            break
    reader.close()
    return out


def test_a_producer_with_each_codec_is_stored(
    child_processes: None, broker: EmbeddedBroker, postgres_url: str, fault_figures
) -> None:
    store = FeedbackStore(postgres_url)
    stored = {}
    for codec in CODECS:
        topic = f"codec-{codec}"
        broker.create_topics(topic, f"{topic}.dlq")
        produce_events(broker.bootstrap, topic, encoded([event(f"{codec}-{i}") for i in range(300)]),
                       compression_type=codec, batch_size=16_384)  # fmt: skip
        before = store.count()
        consumer = drain(config(broker, topic), store)
        stored[codec] = store.count() - before
        assert consumer.blocked is None and consumer.totals.failures == 0, consumer.last_error
    fault_figures("a producer per codec, 300 events each", **stored)
    assert stored == dict.fromkeys(CODECS, 300)
    store.close()


def test_a_codec_this_process_lacks_blocks_loudly_then_recovers(
    child_processes: None,
    broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog,
) -> None:
    """Simulates an image built without python-snappy (the library is hidden from kafka-python,
    the only thing faked here); the broker and the snappy batches are real."""
    broker.create_topics(TOPIC, DLQ)
    produce_events(broker.bootstrap, TOPIC, encoded([event(f"s{i}") for i in range(50)]),
                   compression_type="snappy")  # fmt: skip
    snappy = kafka.codec.snappy
    monkeypatch.setattr(kafka.codec, "snappy", None)
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    consumer = FeedbackConsumer(config(broker), store, ping_interval_s=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.ERROR, logger="alignd.feedback.consumer"):
        thread.start()
        assert wait_until(lambda: consumer.blocked == "unsupported_codec", 30)
    assert not consumer.ready and store.count() == 0
    assert any("ingestion BLOCKED (unsupported_codec)" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(kafka.codec, "snappy", snappy)  # the library is back
    assert wait_until(lambda: store.count() == 50, 30)
    assert wait_until(lambda: consumer.blocked is None and consumer.ready, 10)
    stop.set()
    thread.join(30)
    consumer.close()
    store.close()


@pytest.fixture()
def pg_store(postgres_url: str):
    store = FeedbackStore(postgres_url)
    yield store  # a database of its own (postgres_url): nothing to clean up
    store.close()


def test_an_event_postgresql_refuses_is_dead_lettered_and_its_batch_is_stored(
    child_processes: None, broker: EmbeddedBroker, pg_store: FeedbackStore, fault_figures
) -> None:
    # A rule the validator does not know: the database refuses this one event (CHECK).
    with pg_store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE feedback_events ADD CONSTRAINT no_poison "
                          "CHECK (event_id NOT LIKE 'poison%')"))  # fmt: skip
    broker.create_topics(TOPIC, DLQ)
    events = [event(f"before-{i}") for i in range(100)]
    events.append(event("poison-1"))
    events.append(event("nul-1", served_adapter="v1\u0000"))  # PostgreSQL refuses NUL too
    events += [event(f"after-{i}") for i in range(200)]
    produce_events(broker.bootstrap, TOPIC, encoded(events))
    consumer = drain(config(broker, max_poll_records=500), pg_store)
    assert pg_store.count() == 300
    letters = dead_letters(broker, DLQ, 2)
    reasons = sorted(dict(r.headers)[REASON_HEADER].decode() for r in letters)
    assert reasons == ["control_character", "store_rejected"]
    detail = next(dict(r.headers)["alignd-detail"] for r in letters if b"store_rejected" in
                  dict(r.headers)[REASON_HEADER])  # fmt: skip
    assert b"CheckViolation" in detail and b"poison" not in detail  # no row text in the detail
    fault_figures("a poison event among 302 (PostgreSQL)", stored=pg_store.count(),
                  stored_after_poison=200, dead_lettered=len(letters),
                  failures=consumer.totals.failures)  # fmt: skip


def test_a_rejected_message_with_a_2mb_key_is_dead_lettered(
    child_processes: None, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    broker.create_topics(TOPIC, DLQ)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=8_000_000)
    producer.send(TOPIC, key=b"k" * 2_000_000, value=b"{not json")
    for i in range(20):
        producer.send(TOPIC, key=f"k{i}".encode(), value=json.dumps(event(f"e{i}")).encode())
    producer.flush()
    producer.close()
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    consumer = drain(config(broker), store)
    assert store.count() == 20 and consumer.totals.failures == 0, consumer.last_error
    (letter,) = dead_letters(broker, DLQ, 1)
    headers = dict(letter.headers)
    assert headers[REASON_HEADER] == b"invalid_json"
    assert headers["alignd-key-truncated-from-bytes"] == b"2000000"
    assert len(letter.key) == 1024 and letter.value == b"{not json"
    store.close()
