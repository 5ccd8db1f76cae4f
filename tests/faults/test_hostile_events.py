"""10⁴+ generated malformed and hostile messages mixed with valid ones, through the real broker
and consumer: nothing crashes, every bad message lands in the DLQ with a reason, every valid
event is stored exactly once."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer

from demo.broker import EmbeddedBroker, produce_events
from feedback.config import KafkaConfig
from feedback.consumer import REASON_HEADER, FeedbackConsumer
from feedback.events import REASONS, Rejection, parse_event
from feedback.store import FeedbackStore


def valid(i: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": f"ok-{i}",
        "type": "rating",
        "occurred_at": "2026-11-20T10:00:00Z",
        "prompt": [{"role": "user", "content": f"question {i}"}],
        "completion": f"answer {i}",
        "rating": "up",
    }


def hostile(rng: random.Random, i: int) -> bytes:  # noqa: C901 — one branch per kind of fault
    """One malformed or hostile message, of many kinds."""
    base = valid(i) | {"event_id": f"bad-{i}"}
    kind = rng.randrange(18)
    if kind == 2 and i % 500 and rng.random() < 0.9:  # keep the huge ones to a few dozen
        kind = 3
    if kind == 0:
        return json.dumps(base).encode()[: rng.randrange(1, 40)]  # cut off JSON
    if kind == 1:
        return b"\xff\xfe" + rng.randbytes(rng.randrange(1, 50))  # broken UTF-8
    if kind == 2:
        size = 1_000_000 if i % 500 == 0 else rng.randrange(300_000, 400_000)  # a few 1 MB strings
        return json.dumps(base | {"completion": "x" * size}).encode()
    if kind == 3:
        depth = rng.randrange(200, 3000)
        return ("[" * depth + "]" * depth).encode()  # deep nesting
    if kind == 4:
        return json.dumps(
            base | {"rating": rng.choice([1, None, [], {}, "maybe"])}
        ).encode()  # wrong types
    if kind == 5:
        return json.dumps(
            base | {rng.choice(["admin", "__proto__", "eval", "x"]): 1}
        ).encode()  # unknown field
    if kind == 6:
        return json.dumps(
            base | {"type": rng.choice(["like", "delete", "", "RATING"])}
        ).encode()  # unknown type
    if kind == 7:
        return json.dumps(
            base | {"prompt": [{"role": rng.choice(["root", "bot", ""]), "content": "hi"}]}
        ).encode()
    if kind == 8:
        return json.dumps(base | {"completion": "a\x00b\x07c"}).encode()  # control characters
    if kind == 9:
        return json.dumps(
            base | {"event_id": rng.choice(["../../etc/passwd", "a b", "", "x" * 500])}
        ).encode()
    if kind == 10:
        return json.dumps(
            base | {"occurred_at": rng.choice(["yesterday", "2026-13-40T99:00:00Z", 12345])}
        ).encode()
    if kind == 11:
        return json.dumps(
            base | {"prompt": [{"role": "user", "content": "hi"}] * 500}
        ).encode()  # too many turns
    if kind == 12:
        return json.dumps(rng.choice([[], 1, "string", None, True])).encode()  # not an object
    if kind == 13:
        missing = rng.choice(list(base))
        return json.dumps({k: v for k, v in base.items() if k != missing}).encode()  # missing field
    if kind == 14:
        return json.dumps(base | {"schema_version": rng.choice([0, 2, "1", 1.5])}).encode()
    if kind == 16:  # what PostgreSQL refuses, or a reader is fooled by, in any string
        bad = rng.choice(["\u0000", "\u0085", "\u2028", "\u202e", "\u2066", "\u0007"])
        where = rng.choice(["served_adapter", "trace_id", "actor", "tags", "completion"])
        if where == "actor":
            return json.dumps(base | {"actor": {"kind": "user", "id": f"u{bad}1"}}).encode()
        if where == "tags":
            return json.dumps(base | {"tags": {"category": f"x{bad}"}}).encode()
        return json.dumps(base | {where: f"v{bad}1"}).encode()
    if kind == 17:  # lax values: a bool or float version, a repeated key, invisible text, year 9999
        lax = rng.randrange(4)
        if lax == 0:
            return json.dumps(base | {"schema_version": rng.choice([True, 1.0])}).encode()
        if lax == 1:
            return json.dumps(base).encode()[:-1] + b', "rating": "down"}'
        if lax == 2:
            return json.dumps(base | {"completion": "\u200b\u2060\ufeff"}).encode()
        return json.dumps(base | {"occurred_at": "9999-01-01T00:00:00Z"}).encode()
    return json.dumps(base | {"completion": "   \n\t "}).encode()  # blank text


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=2048)
    | st.text(max_size=512).map(str.encode)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
        max_leaves=30,
    ).map(lambda v: json.dumps(v).encode())
)
def test_parse_event_never_raises_and_always_gives_a_known_reason(raw: bytes) -> None:
    result = parse_event(raw)
    if isinstance(result, Rejection):
        assert result.reason in REASONS and result.detail


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ten_thousand_hostile_messages_through_the_consumer(
    child_processes: None,
    tmp_path: Path,
    fault_figures,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    rng = random.Random(0)
    messages: list[bytes] = []
    n_valid = n_bad = 0
    for i in range(12_000):
        if rng.random() < 0.85:
            messages.append(hostile(rng, i))
            n_bad += 1
        else:
            messages.append(json.dumps(valid(i)).encode())
            n_valid += 1
    assert n_bad >= 10_000
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        # 1 MB messages exceed Kafka's default message size; the producer splits them into their own requests
        produce_events(broker.bootstrap, "alignd.feedback", messages, max_request_size=2_000_000)
        url = (
            request.getfixturevalue("postgres_url")
            if backend == "postgresql"
            else f"sqlite:///{tmp_path / 'f.db'}"
        )
        store = FeedbackStore(url)
        consumer = FeedbackConsumer(
            KafkaConfig(
                bootstrap_servers=broker.bootstrap,
                session_timeout_ms=6000,
                heartbeat_interval_ms=1000,
            ),
            store,
        )
        totals = consumer.run(threading.Event(), until_idle_s=3)
        consumer.close()
        assert totals.consumed == len(messages)
        assert store.count() == n_valid == totals.stored
        assert sum(totals.dead_lettered.values()) == n_bad
        reader = KafkaConsumer(
            "alignd.feedback.dlq",
            bootstrap_servers=broker.bootstrap,
            group_id="dlq-reader",
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            fetch_max_bytes=50_000_000,
            max_partition_fetch_bytes=5_000_000,
        )
        seen: dict[str, str] = {}
        while len(seen) < n_bad:
            batch = reader.poll(timeout_ms=5000)
            if not batch:
                break
            for records in batch.values():
                for r in records:
                    headers = dict(r.headers)
                    seen[
                        headers["alignd-source-partition"].decode()
                        + "/"
                        + headers["alignd-source-offset"].decode()
                    ] = headers[REASON_HEADER].decode()
        reader.close()
        assert len(seen) == n_bad  # every bad message, once per source offset
        assert set(seen.values()) <= REASONS and len(set(seen.values())) >= 10
        fault_figures(
            f"12k messages, 85% hostile ({backend})",
            produced=len(messages),
            stored=store.count(),
            duplicates=totals.duplicates,
            dead_lettered=len(seen),
            distinct_reasons=len(set(seen.values())),
        )
        store.close()
