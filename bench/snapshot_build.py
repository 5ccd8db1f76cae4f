"""Snapshot builds over large stores: seconds, peak RSS and events/s at each size, per store.

    .venv/bin/python bench/snapshot_build.py [--sizes 100000,1000000] [--stores sqlite,postgresql]

Fills a store with realistic v1 events (~1 KB: support prompts, replies, edits, thumbs and
comparisons from 20,000 actors over 200,000 distinct prompts, so the rules have votes to
settle), growing it to each size in turn, and builds a snapshot of it in a fresh child process
each time (the process that builds it, as the daemon's refresh does), reading the child's peak
RSS from the kernel (``wait4``). At the smallest size it also builds with the in-memory rules
(every event loaded, as before the streaming builder) for comparison. Prints one table and the
time ratio between sizes next to the ratio of their event counts (linear growth: equal).
PostgreSQL is a throw-away local server with fsync on.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from feedback.events import parse_event
from feedback.store import FeedbackStore, Incoming

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from services import postgres_server  # the tests' throw-away PostgreSQL

TESTS_FEEDBACK = Path(__file__).resolve().parents[1] / "tests" / "feedback"  # the in-memory oracle

NOW = datetime(2026, 11, 24, tzinfo=UTC)
REPLY = (
    "I'm sorry for any inconvenience this may have caused. Your order {n} left our warehouse on "
    "Monday and is now with the carrier; the tracking number is HB{n}. It should arrive within "
    "two business days. If it does not, reply to this message and we will send a replacement. "
)


def events(start: int, stop: int) -> list[Incoming]:
    rng = random.Random(start)
    out = []
    for i in range(start, stop):
        order = rng.randrange(200_000)
        reply = REPLY.format(n=order)
        raw: dict[str, object] = {
            "schema_version": 1,
            "event_id": f"bench-{i}",
            "occurred_at": (NOW - timedelta(minutes=rng.randrange(300 * 24 * 60))).isoformat(),
            "prompt": [
                {"role": "system", "content": "You are Harbor Support's assistant. Be concise."},
                {"role": "user", "content": f"Hi, my order {order} has not arrived. Where is it?"},
            ],
            "served_adapter": "v0003",
            "actor": {"kind": "agent", "id": f"a{rng.randrange(20_000)}"},
            "tags": {"channel": rng.choice(["chat", "email"])},
        }
        kind = rng.random()
        if kind < 0.5:
            raw |= {"type": "rating", "completion": reply, "rating": rng.choice(["up", "down"])}
        elif kind < 0.9:
            raw |= {"type": "edit", "completion": reply,
                    "edited_completion": reply.split(". ", 1)[-1]}  # fmt: skip
        else:
            raw |= {"type": "comparison", "chosen": reply[60:], "rejected": reply}
        event = parse_event(json.dumps(raw).encode(), now=NOW)
        assert not hasattr(event, "reason"), event
        out.append(Incoming(event))  # type: ignore[arg-type]
    return out


def fill(url: str, start: int, stop: int) -> None:
    store = FeedbackStore(url)
    for at in range(start, stop, 5000):
        store.write_batch(events(at, min(stop, at + 5000)))
    store.close()


CHILD = """
import json, sys, time
from datetime import datetime, UTC
from pathlib import Path
from feedback.config import DatasetConfig
from feedback.store import FeedbackStore
from feedback import snapshot

url, out, mode = sys.argv[1:4]
store = FeedbackStore(url)
config = DatasetConfig(heldout_fraction=0.1)
now = datetime(2026, 11, 24, tzinfo=UTC)
start = time.perf_counter()
if mode == "in-memory":
    sys.path.insert(0, sys.argv[4])
    from dataset_support import build_examples, write_snapshot
    from feedback.manifest import EventRange
    stored = list(store.iter_events())
    manifest = write_snapshot(
        build_examples([s.event for s in stored], config, now), Path(out), config=config,
        event_range=EventRange(count=len(stored), first_seq=None, last_seq=None,
                               first_occurred_at=None, last_occurred_at=None), built_at=now)
else:
    manifest = snapshot.build_snapshot(store, Path(out), config, now=now)
rows = sum(getattr(manifest.counts, k).train + getattr(manifest.counts, k).heldout
           for k in ("pairs", "kto"))
print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows,
                  "sha256": manifest.sha256}))
"""


def build(url: str, out: Path, mode: str) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MB, rows, sha256) of one build in a fresh child process."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(out), mode, str(TESTS_FEEDBACK)],
        stdout=subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed ({proc.returncode})")
    result = json.loads(output)
    return result["seconds"], usage.ru_maxrss / 1024, result["rows"], result["sha256"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    lines = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        Path(tmp).chmod(0o755)  # PostgreSQL runs as its own user when we are root
        for store in args.stores.split(","):
            if store == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'feedback.db'}"
            else:
                server = contextlib.contextmanager(postgres_server)
                url = stack.enter_context(server(Path(tmp) / "pg", fsync=True))
            filled, times = 0, {}
            for size in sizes:
                t = time.perf_counter()
                fill(url, filled, size)
                filled = size
                print(f"{store}: filled to {size:,} events in {time.perf_counter() - t:.0f}s",
                      file=sys.stderr)  # fmt: skip
                modes = ["streaming"] + (["in-memory"] if size == sizes[0] else [])
                for mode in modes:
                    secs, rss, rows, sha = build(
                        url, Path(tmp) / f"snap-{store}-{size}-{mode}", mode
                    )
                    times.setdefault(mode, {})[size] = secs
                    lines.append((store, size, mode, secs, rss, rows, size / secs, sha[:12]))
                    print(f"  {mode}: {secs:.0f}s, peak RSS {rss:.0f} MB", file=sys.stderr)
            for small, large in itertools.pairwise(sizes):
                ratio = times["streaming"][large] / times["streaming"][small]
                lines.append((store, large, f"time x{ratio:.1f} for events x{large / small:.0f}"))
    print(f"{'store':<11}{'events':>11}  {'builder':<11}{'seconds':>9}{'peak RSS MB':>13}"
          f"{'rows':>10}{'events/s':>10}  sha256")  # fmt: skip
    for line in lines:
        if len(line) == 3:
            print(f"{line[0]:<11}{line[1]:>11,}  {line[2]}")
            continue
        store, size, mode, secs, rss, rows, rate, sha = line
        print(f"{store:<11}{size:>11,}  {mode:<11}{secs:>9.1f}{rss:>13.0f}{rows:>10,}"
              f"{rate:>10,.0f}  {sha}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
