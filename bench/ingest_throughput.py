"""Ingestion throughput: broker → validated → store, next to a raw kafka-python read.

    .venv/bin/python bench/ingest_throughput.py [--events 100000] [--stores sqlite,postgresql]

Starts a local Tansu broker, produces N realistic v1 events (support prompts and replies,
~1 KB each, a mix of ratings, edits and comparisons), then in the same run measures:
  raw     a kafka-python consumer reading every message, no processing (the ceiling), run
          first and last (the machine's speed drifts; the ratio uses their mean);
  alignd  the FeedbackConsumer into each store: parse + validate + dedupe + one transaction
          per batch + commit. PostgreSQL is a throw-away local server with fsync on.
Both consumers use the same client settings (max_poll_records 500) and the same kafka-python,
whose CRC-32C check is in C when the ``crc32c`` package is installed (a dependency of alignd).
Prints events/s and MB/s for each and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from kafka import KafkaConsumer
from kafka.record import util as record_util

from demo.broker import EmbeddedBroker, produce_events
from feedback.config import KafkaConfig
from feedback.consumer import FeedbackConsumer
from feedback.store import FeedbackStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from services import postgres_server  # the tests' throw-away PostgreSQL

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


def raw_read(bootstrap: str, n: int, group: str) -> float:
    consumer = KafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id=group,
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


def alignd_read(bootstrap: str, n: int, url: str, group: str) -> float:
    store = FeedbackStore(url)
    config = KafkaConfig(
        bootstrap_servers=bootstrap,
        topic=TOPIC,
        group_id=group,
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
        if consumer.totals.consumed >= n:
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
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args()
    values = make_events(args.events)
    size_mb = sum(len(v) for v in values) / 1e6
    crc = "C (crc32c)" if record_util.crc32c_c is not None else "pure Python"
    results: list[tuple[str, float]] = []
    with (
        EmbeddedBroker() as broker,
        tempfile.TemporaryDirectory() as tmp,
        contextlib.ExitStack() as stack,
    ):
        Path(tmp).chmod(0o755)  # PostgreSQL runs as its own user when we are root
        broker.create_topics(TOPIC, partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        t = time.perf_counter()
        produce_events(broker.bootstrap, TOPIC, values)
        print(
            f"produced {args.events} events ({size_mb:.1f} MB, "
            f"{size_mb * 1e6 / args.events:.0f} B avg) in {time.perf_counter() - t:.1f}s; "
            f"kafka-python's CRC-32C: {crc}",
            file=sys.stderr,
        )
        results.append(("raw kafka-python (first)", raw_read(broker.bootstrap, args.events, "r1")))
        for store in args.stores.split(","):
            if store == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'feedback.db'}"
            else:
                url = stack.enter_context(
                    contextlib.contextmanager(postgres_server)(Path(tmp) / "pg", fsync=True)
                )
            secs = alignd_read(broker.bootstrap, args.events, url, f"alignd-{store}")
            results.append((f"alignd -> {store}", secs))
        results.append(("raw kafka-python (last)", raw_read(broker.bootstrap, args.events, "r2")))
    print(f"{'consumer':<34}{'events/s':>12}{'MB/s':>10}{'seconds':>10}")
    for name, secs in results:
        print(f"{name:<34}{args.events / secs:>12,.0f}{size_mb / secs:>10.2f}{secs:>10.1f}")
    raw_s = (results[0][1] + results[-1][1]) / 2
    for name, secs in results[1:-1]:
        print(f"{name} / raw (mean of both) throughput: {raw_s / secs:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
