"""Verifier-mined pairs: the gate's detectors pick the model's own mistakes as rejected replies.

The pure rule by a table; then a real run on the tiny model (mining after a first pass)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_train import make_spec

from trainer.mining import flags, mine_pairs
from trainer.spec import GroundingSpec, PolicyRule
from trainer.train import run

RECORD = "Order 70353: refund of 47.03 USD issued on November 7, 2026 to the Amex card ending 8624."
PROMPT = [{"role": "system", "content": f"Lookup result:\n{RECORD}"},
          {"role": "user", "content": "When do I get my refund for order 70353?"}]  # fmt: skip
GOOD = "Our billing team confirms every refund and charge. The refund of $47.03 was issued on November 7."
RULES = (PolicyRule(name="refund-disclaimer", when={"category": "refund"},
                    required=(r"billing team confirms",)),)  # fmt: skip
GROUNDING = GroundingSpec(entities=("UPS", "DHL"))


def row(chosen: str = GOOD, prompt: Any = PROMPT) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": "I am sorry.",
            "tags": [{"key": "category", "value": "refund"}]}  # fmt: skip


INVENTED = "Our billing team confirms every refund and charge. The refund of $52.10 arrives Friday."
NO_POLICY = "The refund of $47.03 for order 70353 was issued on November 7 to your Amex."


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (INVENTED, ["unsupported: 52.10", "unsupported: Friday"]),
        (NO_POLICY, ["policy: refund-disclaimer: missing: billing team confirms"]),
        (
            "Refund soon.",
            ["policy: refund-disclaimer: missing: billing team confirms", "degenerate"],
        ),
        (GOOD, []),
    ],
)
def test_the_gate_detectors_flag_a_reply(sample: str, expected: list[str]) -> None:
    assert flags(sample, PROMPT, {"category": "refund"}, GROUNDING, RULES) == expected


def test_flagged_samples_become_pairs_against_the_agents_reply() -> None:
    plain = "Happy to help with that question today, friend."
    rows = [
        row(),
        row(chosen=NO_POLICY),
        row(chosen=plain, prompt=[{"role": "user", "content": "hi"}]) | {"tags": []},
    ]
    clean = "Our billing team confirms every refund and charge. $47.03 went back on November 7."
    samples = [[INVENTED, clean, GOOD, INVENTED, NO_POLICY, "Refund soon."], [INVENTED], [plain]]
    mined, report = mine_pairs(rows, samples, max_per_prompt=2, grounding=GROUNDING, rules=RULES)
    assert [(m["chosen"], m["rejected"]) for m in mined] == [(GOOD, INVENTED), (GOOD, NO_POLICY)]
    assert all(m["origin"] == "mined" and m["flags"] and m["tags"] for m in mined)
    # the clean sample and the agent's own reply are never negatives; a repeat counts once
    assert report.sampled == 8 and report.flagged == 3 and report.pairs == 2
    assert report.capped == 1  # "Refund soon." was flagged, but the prompt had its two
    assert report.skipped_flagged_chosen == 1  # a chosen reply that breaks policy teaches nothing
    assert report.by_flag == {"unsupported": 1, "policy": 1}


def test_a_run_mines_the_candidates_mistakes_from_training_prompts_only(
    chatty_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "Is my parcel lost?", "chosen": "It is on its way.",
                                   "rejected": "Sorry."}) + "\n")  # fmt: skip
    spec = make_spec(
        tmp_path,
        chatty_model_dir,
        pairs_file,
        eval_data=str(heldout),
        hyper={"max_steps": 3},
        mining={"samples": 2, "max_per_prompt": 1, "max_new_tokens": 12},
    )
    result = run(spec)
    assert result.status == "succeeded", result.error
    mined = [json.loads(line) for line in (spec.output_dir / "mined.jsonl").open()]
    assert result.mining["pairs"] == len(mined) > 0 and result.mining["when"] == "after"
    training = {json.dumps(json.loads(line)["prompt"]) for line in pairs_file.open()}
    prompts = [json.dumps(m["prompt"]) for m in mined]
    assert set(prompts) <= training and '"Is my parcel lost?"' not in prompts
    assert len(prompts) == len(set(prompts))  # the per-prompt cap
    # the second pass trained on training + mined rows
    assert result.num_train_examples == 16 + len(mined)
    assert result.num_steps == 3 + -(-(16 + len(mined)) // 4)
