"""``python -m bench.anchor_topk ADAPTER [ADAPTER ...]`` — the anchor's top-k KL against exact.

The retain anchor (``trainer.retain``) keeps the reference's k most likely tokens per position
plus a tail bucket instead of the full distribution. Grouping the tail can only lower a KL, so
the anchor reads at most the exact value; this prints by how much, per k, on the training
retain set's reference replies under SmolLM2 with the given adapters, next to the memory one
reply position costs (exact: the whole vocabulary in float32) and the time of one pass.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from trainer.evalcache import greedy_replies
from trainer.logprobs import collate, response_logits
from trainer.model import load_base
from trainer.retain import (
    encode_replies,
    kl_per_reply,
    load_prompts,
    reference_topk,
    topk_kl,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--ks", default="8,64,256")
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args(argv)
    from peft import PeftModel

    base, tokenizer = load_base("smollm2", torch.device("cpu"))
    model = PeftModel.from_pretrained(base, args.adapters[0], adapter_name="a0")
    for i, path in enumerate(args.adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    prompts = load_prompts("default", shipped="train")[: args.prompts]
    replies = greedy_replies(
        model,
        tokenizer,
        prompts,
        adapter=None,
        identity="bench",
        max_new_tokens=48,
        batch_size=8,
        cache_dir=None,
    )
    examples = encode_replies(tokenizer, prompts, replies)
    pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    positions = sum(len(e.response_ids) for e in examples)
    print(f"{len(examples)} replies, {positions} positions; exact = {vocab * 4} bytes/position")
    print("| adapter | exact nats/reply | k | top-k nats/reply | ratio | bytes/position | s |")
    print("|---|---|---|---|---|---|---|")
    for i, path in enumerate(args.adapters):
        name = f"a{i}"
        exact, _ = kl_per_reply(model, examples, adapter=name, pad_id=pad)
        for k in (int(k) for k in args.ks.split(",")):
            t0 = time.perf_counter()
            top = reference_topk(model, examples, k=k, pad_id=pad)
            with torch.no_grad():
                model.set_adapter(name)
                approx = torch.stack(
                    [
                        topk_kl(response_logits(model, collate([e], pad)), t).sum()
                        for e, t in zip(examples, top, strict=True)
                    ]
                )
            seconds = time.perf_counter() - t0
            mean_exact, mean_top = float(exact.mean()), float(approx.mean())
            print(
                f"| {path} | {mean_exact:.3f} | {k} | {mean_top:.3f} | "
                f"{mean_top / mean_exact:.3f} | {12 * k + 4} | {seconds:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
