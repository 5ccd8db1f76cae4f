"""The regression watch in a real `alignd serve`: a real Tansu broker, the daemon as its own
process, a real SQLite store and registry. The previous adapter's replies were edited 20% of
the time, the newly promoted one's 55%: the daemon rolls it back on its own within a watch
interval of having enough events, rejects it, writes the audit entry with the numbers, counts
it in /metrics, and stores every event."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon_support import Daemon, write_config
from registry_support import make_adapter
from services import wait_until

from daemon.registry import Registry
from demo.broker import EmbeddedBroker, free_port, produce_events

PER_ADAPTER = 240


def served(adapter: str, edited_share: float, prefix: str) -> list[bytes]:
    at = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()  # after both promotions
    out = []
    for i in range(PER_ADAPTER):
        draft = f"I am so sorry about this. Your order {i} left the warehouse on Monday."
        sent = (
            f"Order {i} left the warehouse on Monday." if i < edited_share * PER_ADAPTER else draft
        )
        out.append(json.dumps({
            "schema_version": 1, "event_id": f"{prefix}-{i}", "type": "edit", "occurred_at": at,
            "prompt": [{"role": "user", "content": f"Where is my order {i}?"}],
            "served_adapter": adapter, "completion": draft, "edited_completion": sent,
            "actor": {"kind": "agent", "id": f"agent-{i % 7}"},
        }).encode())  # fmt: skip
    return out


def test_daemon_rolls_back_a_regressed_adapter(child_processes: None, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "data" / "registry")
    passed = {"gate": {"promote": True, "reasons": []}}
    for seed in range(2):
        version = registry.register(make_adapter(tmp_path / f"a{seed}", seed=seed), passed)
        registry.promote(version, actor="operator", reason="setup")
    assert registry.active() == "v0002"
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        overrides = {"watch": {"interval_s": 1, "min_events": 200}}
        config = write_config(tmp_path, broker, tmp_path, port, 1, overrides)
        daemon = Daemon(config, tmp_path, port)
        try:
            # the predecessor's window first: nothing to judge yet
            produce_events(broker.bootstrap, "alignd.feedback", served("v0001", 0.2, "old"))
            assert wait_until(lambda: daemon.get("/v1/status")["store"]["last_seq"] == 240, 60)
            assert wait_until(lambda: (daemon.get("/v1/status")["watch"] or {}).get("status")
                              == "waiting", 10)  # fmt: skip
            assert daemon.get("/v1/status")["active_adapter"] == "v0002"
            produce_events(broker.bootstrap, "alignd.feedback", served("v0002", 0.55, "new"))
            # the rollback writes the active version, then the reject, then the counter: wait for
            # the last, so everything before it is there to read
            assert wait_until(
                lambda: daemon.metric("alignd_rollbacks_total", trigger="watch") == 1, 60
            )
            status = daemon.get("/v1/status")
            assert status["active_adapter"] == "v0001"
            assert status["store"]["last_seq"] == 2 * PER_ADAPTER
            assert status["watch"]["status"] == "regressed", status["watch"]
            assert daemon.get("/v1/adapters/v0002")["state"] == "rejected"
        finally:
            assert daemon.stop() == 0
    entries = [e for e in Registry(tmp_path / "data" / "registry").audit()
               if e["actor"] == "alignd-watch"]  # fmt: skip
    assert [(e["action"], e["version"]) for e in entries] == [
        ("rollback", "v0001"),
        ("reject", "v0002"),
    ]
    assert entries[0]["reason"].startswith("auto-rollback: edit rate 0.55 vs 0.20 (margin 0.05)")
    assert "n = 240 vs 240" in entries[0]["reason"]
