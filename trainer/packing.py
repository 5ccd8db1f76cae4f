"""Running once what pairs and batches share, with exactly the losses of unshared scoring.

- A preference pair is one prompt with two replies that often start alike (an agent's edit
  keeps the draft's opening). :func:`pack_pairs` lays each pair out once as
  ``shared ++ chosen tail ++ rejected tail`` with a tree-shaped attention mask, so the prompt
  and the common response prefix run once, with gradients, instead of twice; pairs are packed
  into rows first-fit, so there is almost no padding either.
- Scoring many replies to prompts that start alike (evaluation, reference passes):
  :func:`sequence_logps_shared_prefix` runs the common prompt prefix once and continues every
  sequence from its key/value cache.
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

from trainer.logprobs import (
    Encoded,
    body_and_head,
    collate,
    head_logps,
    sequence_logps,
    sum_per_sequence,
)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class PairPack:
    """Preference pairs packed into rows, each pair's common start computed once.

    Pair ``i`` occupies one segment of a row: the tokens both sequences start with (the
    prompt and any common response prefix), then the rest of the chosen sequence, then the
    rest of the rejected one. Each tail attends to the shared part and causally to itself,
    never to the other tail, and its positions continue from the shared part — so every
    hidden state is exactly the one an unshared forward would compute.

    ``input_ids``/``position_ids``: ``(R, T)``; ``attention_mask``: ``(R, 1, T, T)`` bool
    (True = may attend). ``rows``/``cols``/``targets``: ``(N,)`` scored predictions, each
    once: a response token of the common prefix is predicted from the same state with the
    same target on both sides, so it is scored once and added to both sums, which keeps every
    loss exact (dropping it instead would only be exact for sum-based DPO/IPO-style margins).
    ``chosen_tokens``/``chosen_pairs`` (and rejected): which scored token adds into which
    pair's sum.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    rows: Tensor
    cols: Tensor
    targets: Tensor
    chosen_tokens: Tensor
    chosen_pairs: Tensor
    rejected_tokens: Tensor
    rejected_pairs: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    computed_tokens: int
    logical_tokens: int


@dataclass
class _Segment:
    ids: list[int]
    positions: list[int]
    branches: list[int]  # 0 shared, 1 chosen tail, 2 rejected tail
    chosen: list[tuple[int, int]]  # (predicting offset, target) per chosen response token
    rejected: list[tuple[int, int]]


def _segment(chosen: Encoded, rejected: Encoded) -> _Segment:
    a = chosen.prompt_ids + chosen.response_ids
    b = rejected.prompt_ids + rejected.response_ids
    # Each side keeps at least its last token out of the shared part (a tail is never empty).
    k = min(_lcp(a, b), len(a) - 1, len(b) - 1)
    tail_a, tail_b = len(a) - k, len(b) - k
    ids = list(a) + list(b[k:])
    positions = list(range(len(a))) + list(range(k, len(b)))
    branches = [0] * k + [1] * tail_a + [2] * tail_b

    def offset_in_b(i: int) -> int:  # where position i of the rejected sequence sits
        return i if i < k else i + tail_a

    start_a, start_b = len(chosen.prompt_ids), len(rejected.prompt_ids)
    return _Segment(
        ids,
        positions,
        branches,
        chosen=[(j - 1, a[j]) for j in range(start_a, len(a))],
        rejected=[(offset_in_b(j - 1), b[j]) for j in range(start_b, len(b))],
    )


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Segment indices per row, longest first into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max(capacity, lengths[i]) - lengths[i])
    return rows


def pack_pairs(
    chosen: Sequence[Encoded],
    rejected: Sequence[Encoded],
    pad_id: int,
    device: torch.device | str = "cpu",
    row_tokens: int = 1024,
) -> PairPack:
    """Pack pairs ``(chosen[i], rejected[i])`` into rows of about ``row_tokens`` tokens."""
    segments = [_segment(c, r) for c, r in zip(chosen, rejected, strict=True)]
    layout = _first_fit([len(s.ids) for s in segments], row_tokens)
    width = max(sum(len(segments[i].ids) for i in row) for row in layout)
    ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(layout), width), dtype=torch.long)
    seg = torch.full((len(layout), width), -1, dtype=torch.long)
    branch = torch.zeros((len(layout), width), dtype=torch.long)
    scored: dict[tuple[int, int, int], int] = {}  # (row, col, target) -> scored token index
    sides: dict[str, tuple[list[int], list[int]]] = {"chosen": ([], []), "rejected": ([], [])}
    for r, row in enumerate(layout):
        offset = 0
        for i in row:
            s = segments[i]
            end = offset + len(s.ids)
            ids[r, offset:end] = torch.tensor(s.ids)
            pos[r, offset:end] = torch.tensor(s.positions)
            branch[r, offset:end] = torch.tensor(s.branches)
            seg[r, offset:end] = i
            for side, predictions in (("chosen", s.chosen), ("rejected", s.rejected)):
                tokens, pairs = sides[side]
                for at, target in predictions:
                    key = (r, offset + at, target)
                    tokens.append(scored.setdefault(key, len(scored)))
                    pairs.append(i)
            offset = end
    same_segment = seg[:, :, None] == seg[:, None, :]
    causal = pos[:, None, :] <= pos[:, :, None]
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    mask = (same_segment & causal & visible).unsqueeze(1)
    coords = torch.tensor(list(scored), dtype=torch.long).reshape(-1, 3)

    def t(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PairPack(
        input_ids=ids.to(device),
        position_ids=pos.to(device),
        attention_mask=mask.to(device),
        rows=coords[:, 0].to(device),
        cols=coords[:, 1].to(device),
        targets=coords[:, 2].to(device),
        chosen_tokens=t(sides["chosen"][0]),
        chosen_pairs=t(sides["chosen"][1]),
        rejected_tokens=t(sides["rejected"][0]),
        rejected_pairs=t(sides["rejected"][1]),
        chosen_lengths=t([len(c.response_ids) for c in chosen]),
        rejected_lengths=t([len(r.response_ids) for r in rejected]),
        computed_tokens=sum(len(s.ids) for s in segments),
        logical_tokens=sum(c.length + r.length for c, r in zip(chosen, rejected, strict=True)),
    )


def _attention_mask_for(model: Any, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean 4-D mask as the model's attention implementation wants it."""
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation == "eager":  # eager adds the mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    if implementation != "sdpa":
        raise ValueError(f"packed pairs need sdpa or eager attention, not {implementation!r}")
    return mask


def pair_logps(model: Any, pack: PairPack) -> tuple[Tensor, Tensor]:
    """Summed response log-probs of the chosen and rejected side of every pair, ``(B,)`` each."""
    body, head = body_and_head(model)
    hidden = body(
        input_ids=pack.input_ids,
        position_ids=pack.position_ids,
        attention_mask=_attention_mask_for(body, pack.attention_mask, torch.float32),
        use_cache=False,
    ).last_hidden_state
    per_token = head_logps(head, hidden[pack.rows, pack.cols], pack.targets)
    n = pack.chosen_lengths.shape[0]
    chosen = per_token.new_zeros(n).index_add(0, pack.chosen_pairs, per_token[pack.chosen_tokens])
    rejected = per_token.new_zeros(n).index_add(
        0, pack.rejected_pairs, per_token[pack.rejected_tokens]
    )
    return chosen, rejected


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
    # Batches of similar lengths pad little; the results go back in the caller's order.
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    ranked = _shared_prefix_logps(
        model, [examples[i] for i in order], pad_id, batch_size, min_prefix, progress
    )
    out = torch.empty_like(ranked)
    out[torch.tensor(order, dtype=torch.long)] = ranked
    return out


def _shared_prefix_logps(
    model: Any,
    examples: Sequence[Encoded],
    pad_id: int,
    batch_size: int,
    min_prefix: int,
    progress: str | None,
) -> Tensor:
    device = next(model.parameters()).device
    shared = common_prefix_length(examples)
    if shared < min_prefix:
        return torch.cat(
            [
                sequence_logps(model, collate(examples[i : i + batch_size], pad_id, device)).cpu()
                for i in range(0, len(examples), batch_size)
            ]
        )
    body, head = body_and_head(model)
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
        per_token = head_logps(head, hidden[rest.rows, rest.cols], rest.targets)
        out.append(sum_per_sequence(per_token, rest).cpu())
    return torch.cat(out)
