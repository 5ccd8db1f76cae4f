"""The canary analysis in a real `alignd serve`: a real Tansu broker, the daemon as its own
process, a real SQLite store and registry. v0001 is stable, v0002 a canary on 10%.

1. A traffic shift raises *both* adapters' edit rates to 60% (the sequential watch cannot tell
   that from a regression), and one account floods the canary with 500 "edited" verdicts: the
   analysis widens the canary (the concurrent control moved alike; the account is left out).
2. Then agents edit the canary's drafts 80% of the time against stable's 60% over the same
   hours: the analysis aborts it on its own numbers, with stable's beside them in the audit
   log, rejects it, and the routing document sends every conversation to stable again."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from daemon_support import Daemon, write_config
from registry_support import make_adapter
from services import wait_until

from daemon.registry import Registry
from demo.broker import EmbeddedBroker, free_port, produce_events

PER_ADAPTER = 240


def served(adapter: str, edited_share: float, prefix: str, agent: str | None = None) -> list[bytes]:
    at = datetime.now(UTC).isoformat()  # after the canary's current step began
    out = []
    for i in range(PER_ADAPTER if agent is None else 500):
        draft = f"Your order {i} has left our warehouse and is on its way to you."
        edited = (i % 20) < edited_share * 20
        out.append(json.dumps({
            "schema_version": 1, "event_id": f"{prefix}-{i}", "type": "edit", "occurred_at": at,
            "prompt": [{"role": "user", "content": f"Where is my order {i}?"}],
            "served_adapter": adapter, "completion": draft,
            "edited_completion": f"Order {i} is on its way." if edited else draft,
            "actor": {"kind": "agent", "id": agent or f"agent-{i % 12}"},
        }).encode())  # fmt: skip
    return out


def test_canary_judged_against_the_concurrent_control(
    child_processes: None, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "data" / "registry")
    passed = {"gate": {"promote": True, "tier": "stable", "reasons": []}}
    stable = registry.register(make_adapter(tmp_path / "a0", seed=0), passed)
    registry.promote(stable, actor="operator", reason="setup")
    canary = registry.register(make_adapter(tmp_path / "a1", seed=1), passed)
    registry.start_canary(canary, 0.1, actor="operator", reason="setup")
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        overrides = {
            "watch": {"enabled": False},
            # every event of a window once its loudest agent's 20 are left out: no verdict on a
            # window half stored (a partial one could widen before the regression is all in)
            "rollout": {"interval_s": 1, "min_events": 220, "min_step_hours": 0},
        }
        daemon = Daemon(
            write_config(tmp_path, broker, tmp_path, port, 1, overrides), tmp_path, port
        )
        try:
            # 1. both adapters at 60% in the same hours, and one account's flood on the canary
            produce_events(broker.bootstrap, "alignd.feedback",
                           served("alignd-v0002", 1.0, "flood", agent="mallory")
                           + served("v0002", 0.6, "shift-c") + served("v0001", 0.6, "shift-s"))  # fmt: skip
            # the registry writes the state, then the audit entry, the routing document, the gauge:
            # wait for the last, so everything before it is there to read
            assert wait_until(lambda: daemon.metric("alignd_canary_fraction") == 0.25, 60)
            assert daemon.get("/v1/routing")["canary"]["fraction"] == 0.25
            widened = next(e for e in registry.audit() if e["action"] == "canary_widen")
            assert widened["actor"] == "alignd-canary", widened
            assert "edit rate 0.60 vs 0.60" in widened["reason"]
            assert "events of its loudest actor left out" in widened["reason"]
            # 2. a regression against stable over the same hours
            produce_events(broker.bootstrap, "alignd.feedback",
                           served("v0002", 0.8, "bad-c") + served("v0001", 0.6, "ok-s"))  # fmt: skip
            assert wait_until(lambda: daemon.metric("alignd_canary_fraction") == 0, 60)
            assert daemon.get("/v1/canary") is None
            assert daemon.get("/v1/adapters/v0002")["state"] == "rejected"
            assert daemon.get("/v1/routing")["canary"] is None
            assert daemon.get("/v1/status")["active_adapter"] == "v0001"
            assert daemon.metric("alignd_canary_verdicts_total", verdict="abort") == 1
        finally:
            assert daemon.stop() == 0
    aborted = [e for e in Registry(tmp_path / "data" / "registry").audit()
               if e["actor"] == "alignd-canary" and e["action"] == "canary_abort"]  # fmt: skip
    assert len(aborted) == 1 and aborted[0]["version"] == "v0002"
    reason = aborted[0]["reason"]
    assert reason.startswith("canary analysis: abort: edit rate 0.80 vs 0.60 (margin 0.05)"), reason
    assert "stable (same hours): edit rate 0.60" in reason
