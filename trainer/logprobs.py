"""Tokenising (prompt, response) pairs and scoring the response tokens.

A sequence is ``prompt tokens ++ response tokens``; the prompt is rendered with the
tokenizer's chat template (``add_generation_prompt=True``) and the response ends with the
end-of-turn token, exactly as the served model would emit it. Only response tokens are scored.

Cost note: a causal LM's head turns every position into a ``V``-wide logit row (49,152 for
SmolLM2). We run the transformer body over the padded batch but apply the head and the
log-softmax only to the ``N`` response positions, so the big ``(N, V)`` tensor never includes
prompt or padding positions — usually well under half of ``B·T``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

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


def _body_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body and the LM head of a causal LM, through a PEFT wrapper if any.

    LoRA layers are injected in place, so calling the body directly still runs the adapter
    (and ``disable_adapter()`` still turns it off).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


def response_logits(model: Any, batch: Batch) -> Tensor:
    """Logits at the scored positions only, ``(N, V)`` in float32."""
    body, head = _body_and_head(model)
    # use_cache=False: a scoring pass never decodes further, so a KV cache would be pure cost.
    hidden = body(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    logits: Tensor = head(hidden[batch.rows, batch.cols]).float()
    return logits


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per scored token, ``(N,)``, via logsumexp (no full log-softmax kept)."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sum_per_sequence(values: Tensor, batch: Batch) -> Tensor:
    """Sum ``(N,)`` per-token values into ``(B,)`` per-sequence totals."""
    out = torch.zeros(batch.lengths.shape[0], dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.rows, values)


def sequence_logps(model: Any, batch: Batch) -> Tensor:
    """Summed log-prob of each response, ``(B,)``; gradients flow unless disabled by the caller."""
    return sum_per_sequence(token_logps(response_logits(model, batch), batch.targets), batch)


def common_prefix_length(examples: Sequence[Encoded]) -> int:
    """Tokens every example's prompt starts with, leaving at least one prompt token each.

    The last prompt token must stay out of the shared part: its hidden state predicts the
    first response token, which is scored.
    """
    if not examples:
        return 0
    first = examples[0].prompt_ids
    limit = min(len(e.prompt_ids) for e in examples) - 1
    n = 0
    while n < limit and all(e.prompt_ids[n] == first[n] for e in examples):
        n += 1
    return n


@torch.no_grad()
def sequence_logps_shared_prefix(
    model: Any,
    examples: Sequence[Encoded],
    pad_id: int,
    batch_size: int,
    min_prefix: int = 8,
    progress: str | None = None,
) -> Tensor:
    """Summed response log-probs ``(M,)`` without recomputing a prefix all examples share.

    Chat templates put the same system prompt in front of every example (~25 tokens for
    SmolLM2); eval and reference scoring run it once, keep its key/value cache, and run only
    the distinct remainder of each example. Inference only: no gradients flow.
    """
    if not examples:
        return torch.zeros(0)
    device = next(model.parameters()).device
    shared = common_prefix_length(examples)
    if shared < min_prefix:
        return torch.cat(
            [
                sequence_logps(model, collate(examples[i : i + batch_size], pad_id, device)).cpu()
                for i in range(0, len(examples), batch_size)
            ]
        )
    body, head = _body_and_head(model)
    prefix = torch.tensor([examples[0].prompt_ids[:shared]], device=device)
    prefix_cache = body(input_ids=prefix, use_cache=True).past_key_values
    out = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(
        starts, desc=progress, unit="batch", disable=progress is None, file=sys.stderr
    ):
        chunk = examples[start : start + batch_size]
        rest = collate(
            [Encoded(e.prompt_ids[shared:], e.response_ids) for e in chunk], pad_id, device
        )
        width = rest.input_ids.shape[1]
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(chunk))
        prefix_mask = torch.ones(
            (len(chunk), shared), dtype=rest.attention_mask.dtype, device=device
        )
        mask = torch.cat([prefix_mask, rest.attention_mask], dim=1)
        positions = torch.arange(shared, shared + width, device=device)
        hidden = body(
            input_ids=rest.input_ids,
            attention_mask=mask,
            past_key_values=cache,
            position_ids=positions.unsqueeze(0).expand(len(chunk), -1),
            cache_position=positions,
            use_cache=True,
        ).last_hidden_state
        logits = head(hidden[rest.rows, rest.cols]).float()
        out.append(sum_per_sequence(token_logps(logits, rest.targets), rest).cpu())
    return torch.cat(out)
