"""Response log-probs: only response tokens count, padding changes nothing, the template is used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.logprobs import collate, encode, render_prompt, sequence_logps
from trainer.packing import common_prefix_length, sequence_logps_shared_prefix


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


def edit_pairs(tok) -> tuple[list, list]:
    """Pairs as agents make them: some edits keep the draft's opening, one rewrites it all,
    one is the draft cut short (a tail of a single end-of-turn token)."""
    rows = [
        ("Where is my order?", "It ships today. Tracking follows.", "It ships today. Sorry!"),
        ("Refund please", "Done, refunded.", "We are so sorry. Refund is on its way."),
        ("Reset my password", "Use the reset link.", "Use the reset link. Let me know!"),
        ("Hi", "Hello! How can I help?", "Hello! How can I help?!!"),
    ]
    chosen = [encode(tok, p, c) for p, c, _ in rows]
    rejected = [encode(tok, p, r) for p, _, r in rows]
    return chosen, rejected


@pytest.mark.parametrize("row_tokens", [1, 64, 4096])  # a row per pair, some rows, one row
def test_packed_pairs_match_unshared_scoring_values_and_gradients(
    tiny_model_dir: Path, row_tokens: int
) -> None:
    from peft import LoraConfig, get_peft_model

    from trainer.packing import pack_pairs, pair_logps

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chosen, rejected = edit_pairs(tok)
    pack = pack_pairs(chosen, rejected, tok.pad_token_id, row_tokens=row_tokens)
    assert pack.computed_tokens < pack.logical_tokens  # the prompt (at least) ran once

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    pc, pr = pair_logps(model, pack)
    packed_grads = grads((pc - 2 * pr).sum())
    plain = sequence_logps(model, collate(chosen + rejected, tok.pad_token_id))
    plain_grads = grads((plain[:4] - 2 * plain[4:]).sum())
    torch.testing.assert_close(pc, plain[:4].detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(pr, plain[4:].detach(), atol=1e-4, rtol=0)
    for a, b in zip(packed_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert pack.chosen_lengths.tolist() == [len(c.response_ids) for c in chosen]


def test_common_response_prefix_is_scored_once(model_and_tokenizer) -> None:
    from trainer.packing import pack_pairs

    _, tok = model_and_tokenizer
    chosen, rejected = edit_pairs(tok)
    pack = pack_pairs(chosen, rejected, tok.pad_token_id)
    response_tokens = sum(
        len(c.response_ids) + len(r.response_ids) for c, r in zip(chosen, rejected, strict=True)
    )
    shared = response_tokens - pack.targets.numel()
    # "It ships today." / "Use the reset link." / "Hello! How can I help?" open both replies
    assert shared >= 3 * len(tok("Use the reset link.")["input_ids"]) - 3
    assert len(pack.chosen_tokens) + len(pack.rejected_tokens) == response_tokens


def test_chunked_head_matches_the_full_head_values_and_gradients() -> None:
    from trainer.logprobs import head_logps, token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    full = token_logps(head(hidden), targets)
    (g_full,) = torch.autograd.grad(full.square().sum(), hidden)
    chunked = head_logps(head, hidden, targets, chunk=8)  # 5 checkpointed chunks
    (g_chunked,) = torch.autograd.grad(chunked.square().sum(), hidden)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(g_chunked, g_full)
