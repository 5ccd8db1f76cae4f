"""Tokenising (prompt, response) pairs and scoring the response tokens.

A sequence is ``prompt tokens ++ response tokens``; the prompt is rendered with the
tokenizer's chat template (``add_generation_prompt=True``) and the response ends with the
end-of-turn token, exactly as the served model would emit it. Only response tokens are scored.

Cost notes:

- A causal LM's head turns every position into a ``V``-wide logit row (49,152 for SmolLM2).
  We apply the head and the log-softmax only to the ``N`` response positions, so the big
  ``(N, V)`` tensor never includes prompt or padding positions, and only a chunk of it at a
  time (:func:`head_logps`).
- Work that pairs and batches share is run once in :mod:`trainer.packing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Messages = list[dict[str, str]]
Prompt = str | Messages


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (prompt, response); the response ids include the end-of-turn token."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class Batch:
    """A right-padded batch with the flat coordinates of the scored (response) tokens.

    ``input_ids``/``attention_mask``: ``(B, T)``. ``rows``/``cols``: ``(N,)`` — the position
    whose hidden state predicts each response token, i.e. one before the token. ``targets``:
    ``(N,)`` the response token ids. ``lengths``: ``(B,)`` response tokens per sequence.
    """

    input_ids: Tensor
    attention_mask: Tensor
    rows: Tensor
    cols: Tensor
    targets: Tensor
    lengths: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def as_messages(prompt: Prompt) -> Messages:
    """A plain-string prompt becomes a single user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text the model sees before its reply: the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(
            as_messages(prompt), add_generation_prompt=True, tokenize=False
        )
        return text
    return (
        prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in as_messages(prompt))
    )


def encode(
    tokenizer: Any,
    prompt: Prompt,
    response: str,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
) -> Encoded:
    """Tokenise one (prompt, response) pair.

    Prompt and response are tokenised separately and concatenated so that the boundary is
    exact (tokenising the joined string can merge tokens across it). Over-long prompts keep
    their *last* ``max_prompt_length`` tokens (the question is at the end); over-long responses
    keep their first tokens. The response always ends with the end-of-turn token unless cut.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-max_prompt_length:]
    response_ids = response_ids[: max(1, max_length - len(prompt_ids))]
    return Encoded(tuple(prompt_ids), tuple(response_ids))


def collate(examples: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-pad a list of encoded examples into a :class:`Batch`."""
    width = max(e.length for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, e in enumerate(examples):
        ids = e.prompt_ids + e.response_ids
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        start = len(e.prompt_ids)
        for j, token in enumerate(e.response_ids):
            rows.append(i)
            cols.append(start + j - 1)
            targets.append(token)
    lengths = torch.tensor([len(e.response_ids) for e in examples], dtype=torch.long)
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        cols=torch.tensor(cols, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        lengths=lengths.to(device),
    )


def body_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body and the LM head of a causal LM, through a PEFT wrapper if any.

    LoRA layers are injected in place, so calling the body directly still runs the adapter
    (and ``disable_adapter()`` still turns it off).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


def response_logits(model: Any, batch: Batch) -> Tensor:
    """Logits at the scored positions only, ``(N, V)`` in float32."""
    body, head = body_and_head(model)
    # use_cache=False: a scoring pass never decodes further, so a KV cache would be pure cost.
    hidden = body(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    logits: Tensor = head(hidden[batch.rows, batch.cols]).float()
    return logits


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per scored token, ``(N,)``, via logsumexp (no full log-softmax kept)."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _head_logps(head: Any, hidden: Tensor, targets: Tensor) -> Tensor:
    return token_logps(head(hidden).float(), targets)


HEAD_CHUNK = 256  # scored tokens per LM-head chunk: ~50 MB of float32 logits for SmolLM2


def head_logps(head: Any, hidden: Tensor, targets: Tensor, chunk: int = HEAD_CHUNK) -> Tensor:
    """``token_logps(head(hidden))`` without ever holding all ``(N, V)`` logits.

    The head runs over ``chunk`` tokens at a time; with gradients on, each chunk is
    checkpointed, so backward recomputes its logits instead of keeping them (the head is
    frozen, so this costs one extra head matmul per chunk and saves ``N·V`` floats several
    times over: the logits, their exponentials and their gradient).
    """
    if hidden.shape[0] <= chunk:
        return _head_logps(head, hidden, targets)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_head_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_head_logps(head, h, t))
    return torch.cat(parts)


def sum_per_sequence(values: Tensor, batch: Batch) -> Tensor:
    """Sum ``(N,)`` per-token values into ``(B,)`` per-sequence totals."""
    out = torch.zeros(batch.lengths.shape[0], dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.rows, values)


def sequence_logps(model: Any, batch: Batch) -> Tensor:
    """Summed log-prob of each response, ``(B,)``; gradients flow unless disabled by the caller."""
    body, head = body_and_head(model)
    hidden = body(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    return sum_per_sequence(head_logps(head, hidden[batch.rows, batch.cols], batch.targets), batch)
