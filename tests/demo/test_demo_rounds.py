"""The demo's loop in rounds, end to end on a tiny random model: the real broker (Tansu), the
real ``alignd serve`` in its own process, real training and reply generation in child
processes. Round 1's candidate must serve a canary on half of round 2's conversations beside
the SFT model (the events name each), the canary analysis must judge it, round 2 must refresh
incrementally from it (its candidate is rejected by design), and the injected regression (the
operator starts that candidate as a canary, forced; half of its drafts invent) must reach the
analysis and never be promoted.

The tiny model's replies are noise, so every reply gets edited whichever adapter served it:
the analysis finds no regression (the abort itself is tested on designed feedback in
tests/daemon/test_canary_e2e.py). The gate's quality checks are off here for the same reason.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from demo.run import run_demo

TINY_RECIPE = {
    "method": "dpo",
    "hyper": {"max_steps": 6, "learning_rate": 0.01, "batch_size": 4, "warmup_ratio": 0},
    "eval": {"factuality_set": None, "generate_max_prompts": 0},
}
OVERRIDES = {
    "training": {"min_pairs": 4},
    "dataset": {"max_length_ratio": 1000.0},  # a reply of noise is one long "word"
    "watch": {"min_events": 10},
    "rollout": {"min_events": 5, "min_actors": 2},  # a tiny round's worth of evidence
    "gate": {
        # round 2's candidate cannot beat its incumbent by this much: the gate rejects it and
        # the injected regression goes through the operator's force-promotion
        "min_gain_over_incumbent": 0.5,
    }
    | {
        name: None
        for name in (
            "factuality_tolerance",
            "max_degenerate_rate",
            "min_distinct_rate",
            "length_band",
            "relevance_tolerance",
            "unsupported_tolerance",
            "max_unsupported_rate",
            "policy_tolerance",
            "min_policy_compliance",
            "chosen_logp_tolerance",
            "drift_budget",
            "min_preference_accuracy",
            "max_actor_share",
        )
    },
}


def test_two_rounds_and_an_injected_regression(
    child_processes: None,
    chatty_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = run_demo(
        tmp_path,
        prompts=40,
        round_prompts=30,
        rounds=2,
        base_model=str(chatty_model_dir),
        run_spec=TINY_RECIPE,
        config_overrides=OVERRIDES,
    )
    assert code == 0
    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["number"] for r in rounds] == [1, 2, 2]  # two rounds, then the injected regression
    first, second, injected = rounds
    assert first["production"]["served"] == "SFT" and first["refresh"]["mode"] == "full"
    assert first["refresh"]["outcome"] == "canary" and first["canary"] is None
    assert first["active_after"] is None and first["canary_after"] == "v0001"
    # round 2: the canary's share beside the SFT model's, over the same hours
    assert second["production"]["served"] == "SFT" and second["canary"]["served"] == "v0001"
    assert second["production"]["requests"] + second["canary"]["requests"] == 30
    assert any(e.startswith("the canary analysis") for e in second["events"]), second["events"]
    assert second["refresh"]["mode"] == "incremental" and second["refresh"]["candidate"] == "v0002"
    assert second["refresh"]["outcome"] == "rejected"
    assert injected["refresh"] is None and injected["canary"]["served"] == "v0002"
    assert injected["canary"]["edit_rate"] > 0.9  # noise replies: every draft rewritten
    assert (
        "an operator started v0002 as a canary past the gate's tier (forced)" in injected["events"]
    )
    verdicts = [e for e in injected["events"] if "the canary analysis" in e]
    assert verdicts and "no canary verdict" not in verdicts[0], injected["events"]
    # its drafts invent: more unsupported specifics than stable's, and never promoted
    assert injected["canary"]["unsupported_rate"] > injected["production"]["unsupported_rate"]
    assert injected["active_after"] != "v0002"

    with sqlite3.connect(tmp_path / "data" / "feedback.db") as db:
        served = dict(db.execute("select coalesce(served_adapter, 'SFT'), count(*) from feedback_events "
                                 "where type in ('edit', 'rating') group by 1").fetchall())  # fmt: skip
    assert set(served) == {"SFT", "v0001", "v0002"}  # every round's events stored, attributed
    shares = [p for r in rounds for p in (r["production"], r["canary"]) if p]
    assert served["v0001"] == sum(
        p["handled"] + p["rated"] for p in shares if p["served"] == "v0001"
    )
    page = (tmp_path / "report.html").read_text()
    assert "Round by round" in page and "v0002" in page
    # the gate table is the console's (daemon/console/templates/macros.html)
    assert "<th>check</th><th>result</th><th>value</th><th>threshold</th>" in page
    # the before/after is the adapter that serves (v0001), the rejected last refresh its gate
    assert "Before / after on held-out prompts (v0001, canary)" in page
    out = capsys.readouterr().out
    assert "the stable adapter now (" in out and "candidate v0001):" in out
    assert "candidate v0002):\ngate: REJECTED" in out
