"""``python -m trainer.probe PROBE.json OUT.json`` — drift of a served adapter.

Input: a :class:`trainer.probespec.ProbeSpec` — the retain set the gate measures drift on
(``eval.retain_set``: 'default' or a JSONL path), the reference replies' length cap and where
they are cached, and the precision and engine training uses (``training.dtype``,
``lora.quantize``, ``run_spec.engine``). Output: a :class:`trainer.probespec.ProbeResult`
(nats per reply with its 95% interval, per token, replies, processes, parameters held):
KL(reference ‖ adapter) summed per reply on the
reference's own replies to the retain set, exact over the vocabulary (``trainer.retain``), the
same measure as the gate's ``drift`` check. Runs on CUDA when there is one; under torchrun with
``engine: fsdp`` the base is sharded as in training (every process runs every forward, process 0
writes). Run by the daemon as a child process, or as a Kubernetes Job where training runs as
Jobs, so the model never lives in the daemon.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel

from trainer.distributed import (
    close_world,
    held_parameters,
    init_world,
    load_base_for,
    shard_model,
)
from trainer.evalcache import greedy_replies
from trainer.model import resolve_base_model, weight_dtype
from trainer.probespec import ProbeResult, ProbeSpec
from trainer.refcache import model_identity
from trainer.retain import (
    drift_report,
    encode_replies,
    kl_per_reply,
    load_prompts,
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m trainer.probe PROBE.json OUT.json", file=sys.stderr)
        return 2
    spec = ProbeSpec.model_validate_json(Path(args[0]).read_text())
    world, device = init_world(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"), spec.engine
    )
    finished = False
    try:
        dtype = weight_dtype(spec.dtype, device)
        quantize = spec.quantize
        base, tokenizer = load_base_for(world, spec.base_model, device, dtype, quantize)
        model = PeftModel.from_pretrained(base, str(spec.adapter), adapter_name="served")
        if world.sharded:
            shard_model(model, world, device)
        prompts = load_prompts(spec.retain_set, shipped="eval")
        identity = model_identity(  # as the trainer names it: the same cached replies
            resolve_base_model(spec.base_model),
            device.type,
            quantize or str(dtype).removeprefix("torch."),
        )
        replies = greedy_replies(
            model,
            tokenizer,
            prompts,
            adapter=None,
            identity=identity,
            max_new_tokens=spec.max_new_tokens,
            batch_size=8,
            cache_dir=spec.cache_dir,
        )
        examples = encode_replies(tokenizer, prompts, replies)
        drift = drift_report(
            *kl_per_reply(model, examples, adapter="served", pad_id=tokenizer.pad_token_id)
        )
        held, total = held_parameters(model)  # this process's share of the weights
        if world.is_main:
            out = ProbeResult(
                **drift.model_dump(), processes=world.size, parameters_held=held, parameters=total
            )
            Path(args[1]).write_text(out.model_dump_json())
        finished = True
    finally:
        close_world(wait_for_peers=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
