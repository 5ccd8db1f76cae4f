"""The promotion gate as a table: each row changes one measurement and names the check it fails."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from daemon.gate import Decision, GateConfig
from daemon.gate import decide_promotion as gate_decision
from trainer.spec import EvalReport


def decide_promotion(
    run: dict[str, Any], incumbent: dict[str, Any] | None, config: GateConfig
) -> Decision:
    """The gate on a run written as plain data (as result.json holds it), parsed as the daemon does."""
    report = EvalReport.model_validate(
        {"candidate": run["candidate"], "reference": run["reference"], "incumbent": incumbent}
    )
    return gate_decision(report, run["detectors"], config)


def good_run() -> dict[str, Any]:
    generation = {
        "empty_rate": 0.0,
        "short_rate": 0.0,
        "repetitive_rate": 0.0,
        "distinct_rate": 1.0,
        "median_words": 20.0,
        "relevance_rate": 0.9,
    }
    return {
        "candidate": {
            "preference": {"reward_accuracy": 0.92, "chosen_logps_per_token": -1.00},
            "kl_to_reference": 0.08,
            "factuality": 0.49,
            "generation": generation,
        },
        "reference": {
            "preference": {"chosen_logps_per_token": -1.02},
            "kl_to_reference": 0.0,
            "factuality": 0.50,
            "generation": generation | {"median_words": 34.0, "relevance_rate": 0.95},
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
    ("over the KL budget", with_("candidate.kl_to_reference", 0.9), None, "kl_budget"),
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
        assert (
            check.threshold is not None and check.detail
        )  # every check reports value and threshold


def test_every_check_is_reported_with_value_and_threshold() -> None:
    decision = decide_promotion(good_run(), INCUMBENT, GateConfig())
    names = {c.name for c in decision.checks}
    assert names == {
        "preference_accuracy",
        "beats_incumbent",
        "factuality",
        "kl_budget",
        "chosen_logp",
        "degenerate_replies",
        "distinct_replies",
        "reply_length",
        "relevance",
        "training_detectors",
    }
    assert all(c.value is not None for c in decision.checks)


def test_checks_can_be_switched_off() -> None:
    run = with_("candidate.kl_to_reference", 5.0)
    assert not decide_promotion(run, None, GateConfig()).promote
    assert decide_promotion(run, None, GateConfig(kl_budget=None)).promote


def test_min_gain_over_incumbent() -> None:
    run = with_("candidate.preference.reward_accuracy", 0.82)
    assert decide_promotion(run, INCUMBENT, GateConfig()).promote
    assert not decide_promotion(run, INCUMBENT, GateConfig(min_gain_over_incumbent=0.05)).promote
