"""Response log-probs: only response tokens count, padding changes nothing, the template is used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.logprobs import (
    collate,
    common_prefix_length,
    encode,
    render_prompt,
    sequence_logps,
    sequence_logps_shared_prefix,
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def full_forward_logp(model, prompt_ids, response_ids) -> float:
    """The textbook computation: full logits, full log-softmax, sum over response positions."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(prompt_ids)
    return sum(float(logp[start + j - 1, tok]) for j, tok in enumerate(response_ids))


def test_matches_full_forward_and_ignores_padding(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    short = encode(tok, "Where is my order?", "It ships today.")
    long = encode(
        tok,
        "I was charged twice for my order, can you refund it please?",
        "Yes. The refund is issued.",
    )
    with torch.no_grad():
        batched = sequence_logps(model, collate([short, long], tok.pad_token_id))
        alone = sequence_logps(model, collate([short], tok.pad_token_id))
    assert batched[0].item() == pytest.approx(
        full_forward_logp(model, short.prompt_ids, short.response_ids), abs=1e-4
    )
    assert batched[1].item() == pytest.approx(
        full_forward_logp(model, long.prompt_ids, long.response_ids), abs=1e-4
    )
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-4)  # padding adds nothing


def test_prompt_tokens_are_not_scored(model_and_tokenizer) -> None:
    _, tok = model_and_tokenizer
    e = encode(tok, "Where is my order?", "It ships today.")
    batch = collate([e], tok.pad_token_id)
    assert batch.targets.tolist() == list(e.response_ids)
    assert batch.lengths.tolist() == [len(e.response_ids)]
    assert batch.cols.min().item() == len(e.prompt_ids) - 1


def test_chat_template_and_end_of_turn(model_and_tokenizer) -> None:
    _, tok = model_and_tokenizer
    text = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "hi") == text  # a plain string is one user turn
    e = encode(tok, "hi", "hello")
    assert e.response_ids[-1] == tok.eos_token_id


def test_truncation_keeps_prompt_end_and_response_start(model_and_tokenizer) -> None:
    _, tok = model_and_tokenizer
    full = encode(tok, "order " * 50, "ships " * 50)
    cut = encode(tok, "order " * 50, "ships " * 50, max_length=40, max_prompt_length=16)
    assert cut.prompt_ids == full.prompt_ids[-16:]
    assert cut.response_ids == full.response_ids[:24]


def test_shared_prefix_scoring_equals_plain_scoring(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    system = {
        "role": "system",
        "content": "You are Harbor Support's assistant. Answer the customer briefly.",
    }
    examples = [
        encode(tok, [system, {"role": "user", "content": question}], answer)
        for question, answer in [
            ("Where is my order?", "It ships today."),
            ("Refund please.", "Done, 3-5 days."),
            ("I cannot log in.", "Reset your password from the account page."),
        ]
    ]
    assert common_prefix_length(examples) >= 8  # the system turn is shared
    with torch.no_grad():
        plain = sequence_logps(model, collate(examples, tok.pad_token_id))
    shared = sequence_logps_shared_prefix(model, examples, tok.pad_token_id, batch_size=2)
    assert torch.allclose(plain, shared, atol=1e-4), (plain, shared)
