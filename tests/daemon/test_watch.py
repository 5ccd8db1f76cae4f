"""The regression watch: the pure decision (a table), its statistics, and the daemon acting on
it in process against a real SQLite store and registry (alert, rollback, refusals)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from daemon_support import in_process_service
from registry_support import make_adapter

import daemon.registry as registry_module
from daemon.service import Service
from daemon.watch import WatchConfig, judge, p_worse
from feedback.events import Actor, parse_event
from feedback.production import AdapterFeedback
from feedback.store import Incoming

CONFIG = WatchConfig(min_events=200, edit_rate_margin=0.05, thumbs_down_margin=0.05, alpha=0.01)


def fb(handled: int, edited: int, rated: int = 0, down: int = 0, top: float = 0.05,
       actors: int = 20) -> AdapterFeedback:  # fmt: skip
    """Edits from ``actors`` agents, the largest one's share ``top``; one rating per user."""
    return AdapterFeedback(handled=handled, edited=edited, rated=rated, down=down, editors=actors,
                           raters=rated, top_edit_share=top,
                           top_rating_share=1 / rated if rated else 0.0)  # fmt: skip


# (case, active, previous, expected status, signals named in the reason)
TABLE = [
    ("too few events", fb(150, 120), fb(1000, 200), "waiting", []),
    ("too few for the predecessor", fb(1000, 800), fb(199, 40), "waiting", []),
    ("equal rates", fb(1000, 220), fb(1000, 220), "ok", []),
    ("better", fb(1000, 100), fb(1000, 300), "ok", []),
    ("worse, clearly", fb(500, 205), fb(1000, 220), "regressed", ["edit rate"]),
    ("worse, but within the margin", fb(2000, 530), fb(2000, 450), "ok", []),
    ("noisy: worse by the margin on few events", fb(220, 66), fb(220, 44), "ok", []),
    ("thumbs down worse only", fb(1000, 220, 800, 300), fb(1000, 220, 800, 120),
     "regressed", ["thumbs down rate"]),
    ("thumbs tested alone when edits are too few", fb(50, 40, 600, 240), fb(50, 5, 600, 90),
     "regressed", ["thumbs down rate"]),
    ("both worse", fb(800, 400, 800, 400), fb(800, 160, 800, 160), "regressed",
     ["edit rate", "thumbs down rate"]),
    ("worse, but from 4 agents", fb(500, 205, actors=4), fb(1000, 220), "waiting", ["4 vs 20 actors"]),
    ("worse, but one agent holds 45% of it", fb(500, 205, top=0.45), fb(1000, 220), "refused",
     ["edit rate", "largest share 0.45", "max_actor_share"]),
    ("edits skewed, thumbs clean: acts on the thumbs", fb(800, 400, 800, 400, top=0.45),
     fb(800, 160, 800, 160), "regressed", ["thumbs down rate"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "active", "previous", "status", "named"), TABLE)
def test_judge_table(
    case: str, active: AdapterFeedback, previous: AdapterFeedback, status: str, named: list[str]
) -> None:
    verdict = judge(active, previous, CONFIG, max_actor_share=0.3)
    assert verdict.status == status, (case, verdict.reason)
    for signal in named:
        assert signal in verdict.reason
    if case.startswith("edits skewed"):
        assert "edit rate" not in verdict.reason
    if status == "regressed":
        assert "n = " in verdict.reason and "p = " in verdict.reason


def test_p_value_is_one_sided_and_uses_the_margin() -> None:
    # identical windows: z = -margin / se < 0, so p > 0.5 with a margin, exactly 0.5 without
    assert p_worse(100, 1000, 100, 1000, 0.0) == pytest.approx(0.5)
    assert p_worse(100, 1000, 100, 1000, 0.05) > 0.99
    # better is never significant, however many events
    assert p_worse(100, 100_000, 300, 100_000, 0.0) > 0.999
    # a hand-computed case: x=41,n=100 vs x=22,n=100, margin 0.05
    pa, pp = 42 / 102, 23 / 102
    z = (pa - pp - 0.05) / math.sqrt(pa * (1 - pa) / 102 + pp * (1 - pp) / 102)
    assert p_worse(41, 100, 22, 100, 0.05) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    # zero-variance windows still give a finite answer
    assert 0 < p_worse(0, 300, 0, 300, 0.0) < 1


def test_bonferroni_split_over_tested_signals() -> None:
    # p for edit rate alone ~0.007: under alpha=0.01 alone, over alpha/2 once thumbs are tested too
    active, previous = fb(400, 152), fb(400, 100)
    p = p_worse(152, 400, 100, 400, 0.05)
    assert 0.005 < p < 0.01, p
    assert judge(active, previous, CONFIG).status == "regressed"
    with_thumbs = judge(fb(400, 152, 400, 40), fb(400, 100, 400, 40), CONFIG)
    assert with_thumbs.status == "ok", with_thumbs.reason


# --- the daemon acting on it ----------------------------------------------------------------

# the registry stamps promotions with the wall clock, so the events are placed around it too:
# a fixed date here made the windows depend on the day the suite runs
NOW = datetime.now(UTC).replace(microsecond=0)


def served_events(adapter: str | None, handled: int, edited: int, *, prefix: str) -> list[Incoming]:
    out = []
    for i in range(handled):
        draft = f"I am so sorry for the trouble. Order {i} ships on Monday."
        raw = {
            "schema_version": 1,
            "event_id": f"{prefix}-{i}",
            "type": "edit",
            "occurred_at": (NOW - timedelta(hours=1)).isoformat(),
            "prompt": [{"role": "user", "content": f"Where is order {i}?"}],
            "served_adapter": adapter,
            "completion": draft,
            "edited_completion": f"Order {i} ships on Monday." if i < edited else draft,
            "actor": {"kind": "agent", "id": f"agent-{i % 10}"},
        }
        event = parse_event(json.dumps(raw).encode(), now=NOW)
        assert not hasattr(event, "reason"), event
        out.append(Incoming(event))  # type: ignore[arg-type]
    return out


def rated_events(adapter: str, users: int, down: int, *, prefix: str,
                 flood: tuple[int, str] = (0, "down")) -> list[Incoming]:  # fmt: skip
    """``users`` users rating one reply each (the first ``down`` thumbs down), then ``flood[0]``
    ratings of ``flood[1]`` from one account."""
    votes = [(f"user-{prefix}-{i}", "down" if i < down else "up") for i in range(users)]
    votes += [("one-account", flood[1])] * flood[0]
    out = []
    for i, (who, value) in enumerate(votes):
        raw = {"schema_version": 1, "event_id": f"{prefix}-r{i}", "type": "rating",
               "occurred_at": (NOW - timedelta(hours=1)).isoformat(),
               "prompt": [{"role": "user", "content": f"Where is order {i}?"}],
               "served_adapter": adapter, "completion": f"Order {i} ships on Monday.",
               "rating": value, "actor": {"kind": "user", "id": who}}  # fmt: skip
        event = parse_event(json.dumps(raw).encode(), now=NOW)
        assert not hasattr(event, "reason"), event
        out.append(Incoming(event))  # type: ignore[arg-type]
    return out


@pytest.fixture()
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """v0001 then v0002 promoted two hours before the events (an hour before NOW): both served
    when their feedback is dated (v0001's within watch.feedback_lag_hours of its end)."""
    with in_process_service(tmp_path, watch={"min_events": 100}) as svc:
        passed = {"gate": {"promote": True, "reasons": []}}
        monkeypatch.setattr(registry_module, "_now", lambda: (NOW - timedelta(hours=2)).isoformat())
        for seed in range(2):
            adapter = make_adapter(tmp_path / f"a{seed}", seed=seed)
            svc.registry.promote(svc.registry.register(adapter, passed), actor="t", reason="setup")
        monkeypatch.undo()
        yield svc


def test_a_worse_adapter_is_rolled_back_and_rejected(service: Service) -> None:
    service.store.write_batch(served_events("v0001", 300, 60, prefix="a"))
    service.store.write_batch(served_events("alignd-v0002", 300, 150, prefix="b"))  # vLLM name
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.status == "regressed", verdict
    assert service.registry.active() == "v0001"
    assert service.registry.state("v0002") == "rejected"
    entries = [e for e in service.registry.audit() if e["actor"] == "alignd-watch"]
    assert [e["action"] for e in entries] == ["rollback", "reject"]
    assert entries[0]["reason"].startswith("auto-rollback: edit rate 0.50 vs 0.20")
    assert "n = 300 vs 300" in entries[0]["reason"]
    assert service.metrics.rollbacks.labels(trigger="watch")._value.get() == 1
    # the restored version is not judged against the one it replaced
    again = service.watch(NOW)
    assert again is not None and again.status == "ok" and "rollback" in again.reason
    assert service.registry.active() == "v0001"
    assert service.store.count() == 600


def test_alert_mode_keeps_the_adapter_and_raises_the_gauge(service: Service) -> None:
    service.watcher.config = service.config.watch.model_copy(update={"action": "alert"})
    service.store.write_batch(served_events("v0001", 300, 60, prefix="a"))
    service.store.write_batch(served_events("v0002", 300, 150, prefix="b"))
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.regressed
    assert service.registry.active() == "v0002"
    assert service.metrics.watch_regressed._value.get() == 1
    exposition = service.desk.metrics_exposition().decode()
    assert (
        'alignd_production_feedback_rate{adapter="v0002",role="active",signal="edit_rate"} 0.5'
        in exposition
    )
    assert (
        'alignd_production_feedback_rate{adapter="v0001",role="previous",signal="edit_rate"} 0.2'
        in exposition
    )


def test_no_action_while_waiting_equal_or_settled(service: Service) -> None:
    service.store.write_batch(served_events("v0001", 300, 60, prefix="a"))
    service.store.write_batch(served_events("v0002", 50, 40, prefix="b"))
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.status == "waiting"
    service.store.write_batch(served_events("v0002", 300, 66, prefix="c"))
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.status == "ok", verdict.reason
    assert service.registry.active() == "v0002"
    # settled: watch_hours after the promotion nothing is judged any more
    changed_at = datetime.fromisoformat(service.registry.activation()["changed_at"])
    later = changed_at + timedelta(hours=service.config.watch.watch_hours + 1)
    service.store.write_batch(served_events("v0002", 300, 300, prefix="d"))
    verdict = service.watch(later)
    assert verdict is not None and verdict.status == "ok" and "active over" in verdict.reason


def test_a_rollback_never_undoes_an_operators_change(service: Service, tmp_path: Path) -> None:
    service.store.write_batch(served_events("v0001", 300, 60, prefix="a"))
    service.store.write_batch(served_events("v0002", 300, 150, prefix="b"))
    # the operator promotes v0003 between the watch's reading and its acting
    passed = {"gate": {"promote": True, "reasons": []}}
    v3 = service.registry.register(make_adapter(tmp_path / "a3", seed=3), passed)
    original = service.registry.activation

    def stale() -> dict[str, object]:
        record = original()
        service.registry.promote(v3, actor="operator", reason="mine")
        service.registry.activation = original  # type: ignore[method-assign]
        return record | {"version": "v0002", "previous": "v0001"}

    service.registry.activation = stale  # type: ignore[method-assign]
    service.watch(NOW)
    assert service.registry.active() == v3
    assert not any(e["actor"] == "alignd-watch" for e in service.registry.audit())


def test_one_accounts_thumbs_down_does_not_roll_back_a_good_adapter(service: Service) -> None:
    """Issue #31, finding 1: 300 users at 10% thumbs-down on each adapter, and 45 thumbs-down
    from one account on the active one, made the watch roll back and reject it."""
    service.store.write_batch(rated_events("v0001", 300, 30, prefix="a"))
    service.store.write_batch(rated_events("v0002", 300, 30, prefix="b", flood=(45, "down")))
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.status == "ok", verdict.reason
    assert "n = 301 vs 300" in verdict.reason  # the account counted once, as one user
    assert service.registry.active() == "v0002"


def test_one_accounts_thumbs_up_does_not_hide_a_regression(service: Service) -> None:
    """The other way round: 3,000 thumbs-up from one account hid 30% vs 10% thumbs-down."""
    service.store.write_batch(rated_events("v0001", 300, 30, prefix="a"))
    service.store.write_batch(rated_events("v0002", 300, 90, prefix="b", flood=(3000, "up")))
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.status == "regressed", verdict.reason
    assert service.registry.active() == "v0001"


def test_a_regression_one_agent_dominates_is_reported_not_acted_on(service: Service) -> None:
    """An agent's newest 100 edits count; one who still supplies over the gate's
    max_actor_share (0.3) of a window cannot roll an adapter back alone."""
    service.store.write_batch(served_events("v0001", 300, 60, prefix="a"))
    honest = served_events("v0002", 180, 36, prefix="b")  # 10 agents at 20%
    agent = Actor(kind="agent", id="x")  # 400 rewritten drafts from one agent
    one = [Incoming(i.event.model_copy(update={"actor": agent}))
           for i in served_events("v0002", 400, 400, prefix="c")]  # fmt: skip
    service.store.write_batch(honest + one)
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.status == "refused", verdict.reason
    assert "n = 280 vs 300" in verdict.reason and "largest share 0.36" in verdict.reason
    assert service.registry.active() == "v0002" and service.registry.state("v0002") == "active"


def test_feedback_dated_outside_a_versions_service_is_not_its_evidence(service: Service) -> None:
    """Issue #31, finding 1: the watch never checked that the named adapter served that reply.
    Thumbs-down naming v0002 but dated a day before it was first promoted do not count."""
    service.store.write_batch(rated_events("v0001", 300, 30, prefix="a"))
    service.store.write_batch(rated_events("v0002", 300, 30, prefix="b"))
    before = (NOW - timedelta(days=1)).isoformat()
    forged = [Incoming(i.event.model_copy(update={"occurred_at": datetime.fromisoformat(before)}))
              for i in rated_events("v0002", 200, 200, prefix="c")]  # fmt: skip
    service.store.write_batch(forged)
    verdict = service.watch(NOW)
    assert verdict is not None and verdict.status == "ok", verdict.reason
    assert service.watcher.production_feedback("v0002", NOW - timedelta(days=3)).outside == 200
