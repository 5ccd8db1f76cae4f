"""Ingestion throughput: broker → validated → SQLite store, next to a raw kafka-python read.

    .venv/bin/python bench/ingest_throughput.py [--events 100000]

Starts a local Tansu broker, produces N realistic v1 events (support prompts and replies,
~1 KB each, a mix of ratings, edits and comparisons), then in the same run measures:
  raw     a kafka-python consumer reading every message, no processing (the ceiling);
  alignd  the FeedbackConsumer: parse + validate + one SQLite transaction per batch + commit.
Prints events/s and MB/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from kafka import KafkaConsumer

from demo.broker import EmbeddedBroker, produce_events
from feedback.config import KafkaConfig
from feedback.consumer import FeedbackConsumer
from feedback.store import FeedbackStore

TOPIC = "alignd.feedback"
REPLY = (
    "I'm sorry for any inconvenience this may have caused. I understand how frustrating it is "
    "when an order does not arrive on time. Your order {n} left our warehouse on Monday and is "
    "now with the carrier; the tracking number is HB{n}. It should arrive within two business "
    "days. If it does not, reply to this message and we will send a replacement at no cost. "
)


def make_events(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        order = 100000 + i
        base = {
            "schema_version": 1,
            "event_id": f"bench-{i}",
            "occurred_at": "2026-11-20T10:00:00Z",
            "prompt": [
                {"role": "system", "content": "You are Harbor Support's assistant. Be concise."},
                {
                    "role": "user",
                    "content": f"Hi, my order {order} has not arrived yet. Where is it?",
                },
            ],
            "served_adapter": "v0003",
            "actor": {"kind": "user", "id": f"u{rng.randrange(10_000)}"},
            "tags": {"channel": rng.choice(["chat", "email"])},
        }
        reply = REPLY.format(n=order)
        kind = rng.random()
        if kind < 0.5:
            event = base | {
                "type": "rating",
                "completion": reply,
                "rating": rng.choice(["up", "down"]),
            }
        elif kind < 0.9:
            edited = reply.split(". ", 2)[-1]
            event = base | {"type": "edit", "completion": reply, "edited_completion": edited}
        else:
            event = base | {"type": "comparison", "chosen": reply[120:], "rejected": reply}
        out.append(json.dumps(event).encode())
    return out


def raw_read(bootstrap: str, n: int) -> float:
    consumer = KafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id="bench-raw",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_records=500,
    )
    seen, start = 0, None
    while seen < n:
        for batch in consumer.poll(timeout_ms=1000).values():
            if start is None:
                start = time.perf_counter()  # exclude the group join, as for alignd below
            seen += len(batch)
    elapsed = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    return elapsed


def alignd_read(bootstrap: str, n: int, db: Path) -> float:
    store = FeedbackStore(f"sqlite:///{db}")
    config = KafkaConfig(
        bootstrap_servers=bootstrap,
        topic=TOPIC,
        group_id="bench-alignd",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_records=500,
    )
    consumer = FeedbackConsumer(config, store)
    stop = threading.Event()
    first: list[float] = []

    def on_batch(_: object) -> None:
        if not first:
            first.append(time.perf_counter())
        if consumer.totals.consumed + 500 >= n and store.count() >= n:
            stop.set()

    consumer.on_batch = on_batch
    consumer.run(stop)
    elapsed = time.perf_counter() - first[0]
    consumer.close()
    assert store.count() == n, store.count()
    store.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    values = make_events(args.events)
    size_mb = sum(len(v) for v in values) / 1e6
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        broker.create_topics(TOPIC, partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        t = time.perf_counter()
        produce_events(broker.bootstrap, TOPIC, values)
        print(
            f"produced {args.events} events ({size_mb:.1f} MB, "
            f"{size_mb * 1e6 / args.events:.0f} B avg) "
            f"in {time.perf_counter() - t:.1f}s",
            file=sys.stderr,
        )
        raw_s = raw_read(broker.bootstrap, args.events)
        alignd_s = alignd_read(broker.bootstrap, args.events, Path(tmp) / "feedback.db")
    print(f"{'consumer':<34}{'events/s':>12}{'MB/s':>10}{'seconds':>10}")
    for name, secs in (
        ("raw kafka-python (no processing)", raw_s),
        ("alignd -> SQLite store", alignd_s),
    ):
        print(f"{name:<34}{args.events / secs:>12,.0f}{size_mb / secs:>10.2f}{secs:>10.1f}")
    print(f"alignd / raw throughput: {raw_s / alignd_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
