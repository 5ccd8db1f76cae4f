"""Progressive delivery, piece by piece: the gate's exposure tiers, the canary analysis (a pure
decision against the concurrent control), the routing rule, and the registry's canary state
with its audit, routing document and refusals. The daemon at work is in test_canary_e2e.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from registry_support import make_adapter
from test_gate import SPREAD, good_run, with_
from test_gate import decide_promotion as gate_on

from daemon.canary import DraftChecks, RolloutConfig, Window, analyse
from daemon.gate import GateConfig, ReviewedCanary, decide_promotion
from daemon.registry import CanaryNotServed, Registry, RegistryConflict
from daemon.rollout import draft_checks, without_loudest
from daemon.routing import bucket, route
from feedback.events import parse_event
from feedback.production import AdapterFeedback, counted, summarize
from trainer.results import EvalReport
from trainer.spec import GroundingSpec, PolicyRule

REVIEWED = ReviewedCanary(max_unsupported_rate=0.2, min_policy_compliance=0.8)


# --- the gate's tiers ---------------------------------------------------------------------------
def tier(run: dict, reviewed: ReviewedCanary | None = REVIEWED) -> tuple[str, bool, str]:
    report = EvalReport.model_validate(
        {"candidate": run["candidate"], "reference": run["reference"]}
    )
    decision = decide_promotion(report, run["detectors"], GateConfig(), SPREAD, reviewed)
    return decision.tier, decision.promote, decision.tier_reason


def test_a_clean_candidate_reaches_the_stable_tier() -> None:
    assert tier(good_run())[:2] == ("stable", True)


def test_reviewable_failures_allow_only_a_reviewed_canary_within_the_ceilings() -> None:
    unclean = with_("candidate.generation.unsupported_rate", 0.14)  # the README's round 3
    assert tier(unclean)[:2] == ("canary", False)  # full promotion still needs every check
    level, promote, why = tier(unclean, reviewed=None)
    assert (level, promote) == ("none", False) and "rollout.reviewed is off" in why
    level, _, why = tier(with_("candidate.generation.unsupported_rate", 0.25))
    assert level == "none" and "unsupported_claims 0.2500, not <= 0.2000" in why
    level, _, why = tier(with_("candidate.generation.policy_compliance", 0.5))
    assert level == "none" and "policy_compliance 0.5000, not >= 0.8000" in why
    assert tier(with_("candidate.generation.policy_compliance", 0.9))[0] == "canary"


def test_a_hard_check_failing_allows_no_exposure_even_reviewed() -> None:
    for path, value, check in (
        ("candidate.factuality", 0.40, "factuality"),
        ("candidate.retain_kl.nats_per_reply", 40.0, "drift"),
        ("candidate.generation.distinct_rate", 0.1, "distinct_replies"),
    ):
        run = with_(path, value)
        run["candidate"]["generation"]["unsupported_rate"] = 0.1  # a reviewable failure too
        level, promote, why = tier(run)
        assert (level, promote) == ("none", False) and check in why, why


def test_the_full_promotion_table_is_unchanged_by_tiers() -> None:
    # the gate without rollout config decides as before: promote == every check passed
    decision = gate_on(with_("candidate.generation.unsupported_rate", 0.14), None, GateConfig())
    assert not decision.promote and decision.tier == "none"


# --- the analysis ------------------------------------------------------------------------------
def window(handled: int, edited: int, editors: int = 30, **drafts: int) -> Window:
    feedback = AdapterFeedback(handled=handled, edited=edited, editors=editors,
                               top_edit_share=1 / editors)  # fmt: skip
    return Window(feedback, DraftChecks(**drafts) if drafts else DraftChecks())


CONFIG = RolloutConfig(min_events=100, min_actors=5, min_step_hours=1.0)


def test_a_canary_edited_twenty_points_more_is_aborted_with_stables_numbers() -> None:
    verdict = analyse(window(200, 90), window(200, 50), CONFIG, fraction=0.1, step_hours=2,
                      tier="stable")  # fmt: skip
    assert verdict.action == "abort"
    text = verdict.describe()
    assert "edit rate 0.45 vs 0.25" in text and "stable (same hours): edit rate 0.25" in text


def test_a_traffic_shift_that_moves_both_adapters_alike_does_not_abort() -> None:
    # both adapters' edit rates rose from 25% to 60% in the same hours: no difference between them
    verdict = analyse(window(200, 120), window(200, 120), CONFIG, fraction=0.1, step_hours=2,
                      tier="stable")  # fmt: skip
    assert verdict.action == "widen" and verdict.to_fraction == 0.25


def test_the_sequential_watch_reads_the_same_shift_as_a_regression() -> None:
    """Why the canary needs a concurrent control: the watch compares the new adapter with its
    predecessor's *earlier* window, so a shift from 25% to 60% in every adapter's edit rate
    reads as the new adapter's doing."""
    from daemon.watch import WatchConfig, judge

    before_the_shift, after_it = window(200, 50).feedback, window(200, 120).feedback
    watch = WatchConfig(min_events=100, min_actors=5)
    assert judge(after_it, before_the_shift, watch).status == "regressed"
    concurrent = analyse(window(200, 120), window(200, 120), CONFIG, fraction=0.1,
                         step_hours=2, tier="stable")  # fmt: skip
    assert concurrent.action == "widen"


def test_too_little_evidence_or_time_continues() -> None:
    few = analyse(window(50, 40), window(50, 5), CONFIG, fraction=0.1, step_hours=5, tier="stable")
    assert few.action == "continue" and "waiting for evidence" in few.reason
    early = analyse(window(200, 50), window(200, 50), CONFIG, fraction=0.1, step_hours=0.5,
                    tier="stable")  # fmt: skip
    assert early.action == "continue" and "0.5 h of 1 h" in early.reason


def test_the_last_step_promotes_only_a_stable_tier_canary() -> None:
    same = (window(200, 50), window(200, 50))
    promoted = analyse(*same, CONFIG, fraction=0.5, step_hours=2, tier="stable")
    assert promoted.action == "promote"
    held = analyse(*same, CONFIG, fraction=0.5, step_hours=2, tier="canary")
    assert held.action == "continue" and "needs every gate check" in held.reason


def test_served_drafts_stating_unsupported_specifics_abort_a_canary() -> None:
    canary = window(200, 50, drafts=200, unsupported=40, actors=30, top_share=0.05)
    stable = window(200, 50, drafts=200, unsupported=4, actors=30, top_share=0.05)
    verdict = analyse(canary, stable, CONFIG, fraction=0.1, step_hours=2, tier="canary")
    assert verdict.action == "abort" and "unsupported rate 0.20 vs 0.02" in verdict.reason


def edit(i: int, served: str, edited: bool, agent: str) -> object:
    draft = f"Your order {i} ships Monday."
    return parse_event(json.dumps({
        "schema_version": 1, "event_id": f"{served}-{agent}-{i}", "type": "edit",
        "occurred_at": "2026-12-01T10:00:00+00:00", "served_adapter": served,
        "prompt": [{"role": "user", "content": f"Where is order {i}?"}],
        "completion": draft, "edited_completion": draft + " Sorry." if edited else draft,
        "actor": {"kind": "agent", "id": agent},
    }).encode())  # fmt: skip


def judged(events: list) -> Window:
    """A window as the daemon builds it: capped per actor, then without its loudest actor."""
    kept, _ = counted(events, CONFIG.per_actor())
    return without_loudest(kept, GroundingSpec(), [])


def test_one_account_cannot_flip_a_verdict_either_way() -> None:
    honest = [edit(i, "c", i % 4 == 0, f"agent-{i % 20}") for i in range(200)]
    stable = judged([edit(i, "s", i % 4 == 0, f"agent-{i % 20}") for i in range(200)])
    # one account floods the canary with "edited" verdicts on the drafts it says it handled
    flood = [edit(1000 + i, "c", True, "mallory") for i in range(3000)]
    verdict = analyse(judged(flood + honest), stable, CONFIG, fraction=0.1, step_hours=2,
                      tier="stable", max_actor_share=0.3)  # fmt: skip
    assert verdict.action == "widen", verdict.describe()
    assert "100 events of its loudest actor left out" in verdict.describe()
    # without leaving the loudest out, its 100 capped events alone would abort the canary
    kept, _ = counted(flood + honest, CONFIG.per_actor())
    unfair = Window(summarize(kept), DraftChecks())
    assert analyse(unfair, stable, CONFIG, fraction=0.1, step_hours=2, tier="stable").action == (
        "abort"
    )
    # the other way: a real regression (75% vs 25%) under one account's unedited sends
    bad = [edit(i, "c", i % 4 != 0, f"agent-{i % 20}") for i in range(200)]
    cover = [edit(5000 + i, "c", False, "mallory") for i in range(3000)]
    verdict = analyse(judged(cover + bad), stable, CONFIG, fraction=0.1, step_hours=2,
                      tier="stable", max_actor_share=0.3)  # fmt: skip
    assert verdict.action == "abort", verdict.describe()


def test_draft_checks_run_the_gates_detectors_on_each_events_conversation() -> None:
    rule = PolicyRule(name="billing", when={"category": "billing"}, required=["billing team"])

    def rated(i: int, reply: str, tags: dict[str, str]) -> object:
        return parse_event(json.dumps({
            "schema_version": 1, "event_id": f"r{i}", "type": "rating",
            "occurred_at": "2026-12-01T10:00:00+00:00", "rating": "up", "tags": tags,
            "prompt": [{"role": "user", "content": "Refund for order 4411? record: amount 58.20 USD"}],
            "completion": reply, "actor": {"kind": "user", "id": f"u{i}"},
        }).encode())  # fmt: skip

    events = [
        rated(0, "Your refund of 58.20 USD for order 4411 is on its way.", {}),
        rated(1, "Your refund of 99.00 USD for order 4411 is on its way.", {}),  # invented
        rated(2, "The billing team confirms 58.20 USD for order 4411.", {"category": "billing"}),
        rated(3, "We refunded 58.20 USD for order 4411 today, thanks.", {"category": "billing"}),
    ]
    checks = draft_checks(events, GroundingSpec(), [rule])  # type: ignore[arg-type]
    assert (checks.drafts, checks.unsupported, checks.ruled, checks.broken) == (4, 1, 2, 1)
    assert checks.actors == 4 and checks.policy_compliance == 0.5


# --- routing -----------------------------------------------------------------------------------
def test_routing_is_deterministic_and_widening_only_moves_conversations_to_the_canary() -> None:
    stable = {"version": "v0001", "adapter": "alignd-v0001"}
    doc = {"stable": stable, "canary": {"adapter": "alignd-v0002", "fraction": 0.1}}
    wide = {"stable": stable, "canary": {"adapter": "alignd-v0002", "fraction": 0.25}}
    ids = [f"conversation-{i}" for i in range(4000)]
    narrow_roles = [route(doc, c)[0] for c in ids]
    assert narrow_roles == [route(doc, c)[0] for c in ids]  # the same answer every time
    share = narrow_roles.count("canary") / len(ids)
    assert 0.08 < share < 0.12, share
    assert all(
        route(wide, c)[0] == "canary"
        for c, r in zip(ids, narrow_roles, strict=True)
        if r == "canary"
    )
    assert 0 <= bucket("x") < 1 and route({"stable": stable, "canary": None}, "x")[0] == "stable"


# --- the registry ------------------------------------------------------------------------------
def registered(tmp_path: Path, registry: Registry, tier: str, seed: int) -> str:
    gate = {"promote": tier == "stable", "tier": tier, "tier_reason": f"{tier} tier",
            "reasons": [] if tier == "stable" else ["unsupported_claims: 0.14 > 0.05"]}  # fmt: skip
    return registry.register(make_adapter(tmp_path / f"a{seed}", seed=seed), {"gate": gate})


def test_registry_canary_lifecycle_audited_with_its_routing_document(tmp_path: Path) -> None:
    loaded: list[str] = []
    registry = Registry(tmp_path / "r", canary_hooks=[lambda v, p: loaded.append(v)])
    stable = registered(tmp_path, registry, "stable", 0)
    registry.promote(stable, actor="op", reason="setup")
    canary = registered(tmp_path, registry, "canary", 1)
    none = registered(tmp_path, registry, "none", 2)
    with pytest.raises(RegistryConflict, match="allows v0003 no canary"):
        registry.start_canary(none, 0.1, actor="op", reason="try")
    registry.start_canary(canary, 0.1, actor="alignd-gate", reason="tier canary")
    assert loaded == [canary] and registry.state(canary) == "canary"
    routing = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert routing["stable"] == {"version": "v0001", "adapter": "alignd-v0001"}
    assert routing["canary"] == {"version": "v0002", "adapter": "alignd-v0002", "fraction": 0.1}
    second = registered(tmp_path, registry, "stable", 3)
    with pytest.raises(RegistryConflict, match="is the canary"):
        registry.start_canary(second, 0.1, actor="op", reason="second")  # at most one
    with pytest.raises(RegistryConflict, match=r"not 0\.05"):
        registry.widen_canary(0.05, actor="op", reason="narrower")
    registry.widen_canary(0.25, actor="alignd-canary", reason="analysis", expect_version=canary)
    assert registry.routing()["canary"]["fraction"] == 0.25
    # a reviewed-tier canary never reaches all traffic without every check (or a force)
    with pytest.raises(RegistryConflict, match="needs every gate check"):
        registry.promote(canary, actor="op", reason="all traffic")
    assert registry.abort_canary(actor="alignd-canary", reason="worse", reject=True) == canary
    assert registry.canary() is None and registry.routing()["canary"] is None
    assert registry.state(canary) == "rejected"
    actions = [(e["action"], e.get("version")) for e in registry.audit()
               if e["action"] != "register"][-4:]  # fmt: skip
    assert actions == [("canary_start", canary), ("canary_widen", canary),
                       ("canary_abort", canary), ("reject", canary)]  # fmt: skip


def test_a_stable_tier_canary_promoted_ends_the_canary(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    first = registered(tmp_path, registry, "stable", 0)
    registry.promote(first, actor="op", reason="setup")
    second = registered(tmp_path, registry, "stable", 1)
    registry.start_canary(second, 0.5, actor="op", reason="canary first")
    registry.promote(second, actor="alignd-canary", reason="analysis: promote")
    assert registry.active() == second and registry.canary() is None
    assert registry.routing() | {"changed_at": ""} == {
        "changed_at": "", "rule": registry.routing()["rule"],
        "stable": {"version": second, "adapter": f"alignd-{second}"}, "canary": None,
    }  # fmt: skip
    assert [e["action"] for e in registry.audit()][-2:] == ["promote", "canary_end"]


def test_a_canary_the_servers_cannot_load_is_not_recorded(tmp_path: Path) -> None:
    def down(version: str, path: Path) -> None:
        raise ConnectionError("vLLM refused")

    registry = Registry(tmp_path / "r", canary_hooks=[down])
    version = registered(tmp_path, registry, "canary", 0)
    revision = registry.revision()
    with pytest.raises(CanaryNotServed, match="vLLM refused"):
        registry.start_canary(version, 0.1, actor="op", reason="try")
    assert registry.canary() is None and registry.revision() == revision
    assert not (tmp_path / "r" / "routing.json").exists()


def test_a_newer_candidate_supersedes_the_running_canary(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    old = registered(tmp_path, registry, "canary", 0)
    new = registered(tmp_path, registry, "canary", 1)
    registry.start_canary(old, 0.1, actor="alignd-gate", reason="first")
    registry.start_canary(new, 0.1, actor="alignd-gate", reason="next", supersede=True)
    assert registry.canary_version() == new
    abort = [e for e in registry.audit() if e["action"] == "canary_abort"]
    assert abort and abort[-1]["version"] == old and "superseded by v0002" in abort[-1]["reason"]
    assert datetime.fromisoformat(registry.canary()["started_at"]) <= datetime.now(UTC)
