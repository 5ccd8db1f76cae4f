"""The promotion gate as a table: each row changes one measurement and names the check it fails."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from daemon.gate import Decision, GateConfig
from daemon.gate import decide_promotion as gate_decision
from feedback.manifest import ActorShares
from trainer.results import EvalReport

# Forty actors, none supplying more than 4% of the rows.
SPREAD = ActorShares(
    distinct=40, unattributed_rows=0, largest_share=0.04, largest_heldout_share=0.05, top=[]
)


def decide_promotion(
    run: dict[str, Any],
    incumbent: dict[str, Any] | None,
    config: GateConfig,
    actors: ActorShares | None = SPREAD,
) -> Decision:
    """The gate on a run written as plain data (as result.json holds it), parsed as the daemon does."""
    report = EvalReport.model_validate(
        {"candidate": run["candidate"], "reference": run["reference"], "incumbent": incumbent}
    )
    return gate_decision(report, run["detectors"], config, actors)


def good_run() -> dict[str, Any]:
    generation = {
        "empty_rate": 0.0,
        "short_rate": 0.0,
        "repetitive_rate": 0.0,
        "distinct_rate": 1.0,
        "median_words": 20.0,
        "relevance_rate": 0.9,
        "num_replies": 48,
        "unsupported_rate": 0.02,
        "grounded_rate": 0.85,
        "policy_compliance": 1.0,
        "policy_replies": 18,
        "policy_rules": ["billing-disclaimer"],
    }
    return {
        "candidate": {
            "preference": {"reward_accuracy": 0.92, "chosen_logps_per_token": -1.00},
            # the requested change (the demo's round-1 figure): reported, never budgeted
            "kl_to_reference": 1.22,
            "retain_kl": {
                "nats_per_reply": 1.5,
                "ci95": 0.4,
                "nats_per_token": 0.04,
                "num_replies": 63,
            },
            "factuality": 0.49,
            "generation": generation,
        },
        "reference": {
            "preference": {"chosen_logps_per_token": -1.02},
            "kl_to_reference": 0.0,
            "retain_kl": {
                "nats_per_reply": 0.0,
                "ci95": 0.0,
                "nats_per_token": 0.0,
                "num_replies": 63,
            },
            "factuality": 0.50,
            "generation": generation
            | {
                "median_words": 34.0,
                "relevance_rate": 0.95,
                "unsupported_rate": 0.30,
                "grounded_rate": 0.10,
                "policy_compliance": 0.0,
            },
        },
        "detectors": {
            "non_finite_loss": {"fired": False},
            "reference_mismatch": {"fired": False},
            "sign_bug": {"fired": False},
            "likelihood_collapse": {"fired": False},
        },
    }


def with_(path: str, value: Any) -> dict[str, Any]:
    run = copy.deepcopy(good_run())
    *parents, leaf = path.split(".")
    node = run
    for key in parents:
        node = node[key]
    node[leaf] = value
    return run


INCUMBENT = {"preference": {"reward_accuracy": 0.80}}

CASES = [
    ("healthy candidate", good_run(), None, None),
    ("healthy, beats incumbent", good_run(), INCUMBENT, None),
    (
        "low preference accuracy",
        with_("candidate.preference.reward_accuracy", 0.55),
        None,
        "preference_accuracy",
    ),
    (
        "worse than incumbent",
        with_("candidate.preference.reward_accuracy", 0.75),
        INCUMBENT,
        "beats_incumbent",
    ),
    ("factuality dropped 5 points", with_("candidate.factuality", 0.45), None, "factuality"),
    ("drifted off-target", with_("candidate.retain_kl.nats_per_reply", 23.0), None, "drift"),
    ("drift not measured", with_("candidate.retain_kl", None), None, "drift"),
    (
        "chosen log-prob collapsed",
        with_("candidate.preference.chosen_logps_per_token", -1.5),
        None,
        "chosen_logp",
    ),
    # docs/ARCHITECTURE.md's measured collapse: 0.75 words per reply, several empty
    (
        "replies collapsed to nothing",
        with_(
            "candidate.generation",
            {
                "empty_rate": 0.4,
                "short_rate": 0.9,
                "repetitive_rate": 0.0,
                "distinct_rate": 0.3,
                "median_words": 1.0,
                "relevance_rate": 0.1,
            },
        ),
        None,
        "degenerate_replies",
    ),
    # "I'm here to assist you." to every customer
    (
        "same reply to every prompt",
        with_("candidate.generation.distinct_rate", 0.1),
        None,
        "distinct_replies",
    ),
    ("replies much longer", with_("candidate.generation.median_words", 80.0), None, "reply_length"),
    (
        "replies ignore the request",
        with_("candidate.generation.relevance_rate", 0.3),
        None,
        "relevance",
    ),
    (
        "a detector fired",
        with_("detectors.likelihood_collapse", {"fired": True}),
        None,
        "training_detectors",
    ),
    (
        "not measured: no held-out pairs",
        with_("candidate.preference", {}),
        None,
        "preference_accuracy",
    ),
    ("not measured: no generation", with_("candidate.generation", {}), None, "degenerate_replies"),
    # the demo adapter: "$16.45" for a $164.58 charge, in 1 of 3 replies
    (
        "states unsupported specifics (over the ceiling, under the reference)",
        with_("candidate.generation.unsupported_rate", 0.33),
        None,
        "unsupported_claims",
    ),
    (
        "more unsupported specifics than the reference",
        with_("reference.generation.unsupported_rate", 0.0)
        | {"candidate": with_("candidate.generation.unsupported_rate", 0.04)["candidate"]},
        None,
        "unsupported_claims",
    ),
    (
        "not measured: no unsupported rate for the reference",
        with_("reference.generation.unsupported_rate", None),
        None,
        "unsupported_claims",
    ),
    (
        "drops the policy sentence",
        with_("candidate.generation.policy_compliance", 0.6),
        None,
        "policy_compliance",
    ),
    (
        "policy compliance below the reference's",
        with_("reference.generation.policy_compliance", 1.0)
        | {"candidate": with_("candidate.generation.policy_compliance", 0.97)["candidate"]},
        None,
        "policy_compliance",
    ),
    (
        "rules configured, no held-out reply they apply to",
        with_("candidate.generation.policy_compliance", None),
        None,
        "policy_compliance",
    ),
]


@pytest.mark.parametrize(("name", "run", "incumbent", "failing"), CASES, ids=[c[0] for c in CASES])
def test_gate_table(
    name: str, run: dict[str, Any], incumbent: dict[str, Any] | None, failing: str | None
) -> None:
    decision = decide_promotion(run, incumbent, GateConfig())
    failed = [c.name for c in decision.failed]
    if failing is None:
        assert decision.promote, decision.reasons
        assert failed == []
    else:
        assert not decision.promote
        assert failing in failed, decision.reasons
        check = next(c for c in decision.checks if c.name == failing)
        assert check.detail  # every check says why
        if check.value is not None:
            assert check.threshold is not None  # a measured value is compared with a threshold


def test_every_check_is_reported_with_value_and_threshold() -> None:
    decision = decide_promotion(good_run(), INCUMBENT, GateConfig())
    names = {c.name for c in decision.checks}
    assert names == {
        "preference_accuracy",
        "beats_incumbent",
        "factuality",
        "drift",
        "chosen_logp",
        "degenerate_replies",
        "distinct_replies",
        "reply_length",
        "relevance",
        "unsupported_claims",
        "policy_compliance",
        "actor_share",
        "training_detectors",
    }
    assert all(c.value is not None for c in decision.checks)


def test_one_actor_supplying_most_of_the_evidence_is_rejected() -> None:
    flood = SPREAD.model_copy(update={"largest_share": 0.2, "largest_heldout_share": 0.87})
    decision = decide_promotion(good_run(), None, GateConfig(), flood)
    check = next(c for c in decision.checks if c.name == "actor_share")
    assert not decision.promote and not check.passed and check.value == 0.87
    # Unknown shares (a manifest from before shares) are not evidence of a spread.
    assert not decide_promotion(good_run(), None, GateConfig(), None).promote
    assert decide_promotion(good_run(), None, GateConfig(max_actor_share=None), None).promote


def test_curated_set_is_checked_when_one_is_configured(tmp_path) -> None:
    curated = tmp_path / "curated.jsonl"
    curated.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    config = GateConfig(curated_heldout=curated)
    run = good_run()
    assert not decide_promotion(run, None, config).promote  # configured but not measured
    run["candidate"]["curated"] = {"num_pairs": 40, "reward_accuracy": 0.55}
    check = next(
        c for c in decide_promotion(run, None, config).checks if c.name == "curated_accuracy"
    )
    assert not check.passed and check.value == 0.55
    run["candidate"]["curated"]["reward_accuracy"] = 0.9
    assert decide_promotion(run, None, config).promote
    with pytest.raises(ValueError, match="not a file"):
        GateConfig(curated_heldout=tmp_path / "missing.jsonl")


def test_checks_can_be_switched_off() -> None:
    run = with_("candidate.retain_kl.nats_per_reply", 50.0)
    assert not decide_promotion(run, None, GateConfig()).promote
    assert decide_promotion(run, None, GateConfig(drift_budget=None)).promote


def test_the_retired_kl_budget_key_fails_naming_its_successor() -> None:
    with pytest.raises(ValueError, match="kl_budget was replaced by drift_budget"):
        GateConfig.model_validate({"kl_budget": 0.5})


def test_min_gain_over_incumbent() -> None:
    run = with_("candidate.preference.reward_accuracy", 0.82)
    assert decide_promotion(run, INCUMBENT, GateConfig()).promote
    assert not decide_promotion(run, INCUMBENT, GateConfig(min_gain_over_incumbent=0.05)).promote


def test_policy_check_passes_when_no_rule_is_configured() -> None:
    run = with_("candidate.generation.policy_rules", [])
    run["candidate"]["generation"]["policy_compliance"] = None
    decision = decide_promotion(run, None, GateConfig())
    check = next(c for c in decision.checks if c.name == "policy_compliance")
    assert decision.promote and check.passed and check.value is None
    assert "no policy rules configured" in check.detail


def test_unsupported_threshold_is_the_tighter_of_ceiling_and_reference() -> None:
    decision = decide_promotion(good_run(), None, GateConfig())
    check = next(c for c in decision.checks if c.name == "unsupported_claims")
    assert check.threshold == 0.05 and "ceiling" in check.detail  # reference 0.30 + 0.02 is looser
    run = with_("reference.generation.unsupported_rate", 0.01)
    check = next(
        c for c in decide_promotion(run, None, GateConfig()).checks if c.name == check.name
    )
    assert check.threshold == pytest.approx(0.03) and "reference" in check.detail
    assert check.passed  # candidate 0.02 <= 0.01 + 0.02
