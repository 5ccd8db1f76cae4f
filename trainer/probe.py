"""``python -m trainer.probe PROBE.json OUT.json`` — KL drift of a served adapter.

Input: ``{"base_model", "adapter", "examples": [{"prompt", "response"}], "dtype"?,
"quantize"?, "engine"?}`` — recent production prompts with the replies actually served, and
the precision and engine training uses (``training.dtype``, ``lora.quantize``,
``run_spec.engine``). Output: ``{"kl_to_reference": nats/token, "n", "processes",
"parameters_held", "parameters"}``, the
teacher-forced KL(adapter ‖ reference) exact over the vocabulary. Runs on CUDA when there is
one; under torchrun with ``engine: fsdp`` the base is sharded as in training (every process
runs every forward, process 0 writes). Run by the daemon as a child process, or as a
Kubernetes Job where training runs as Jobs, so the model never lives in the daemon.
"""

from __future__ import annotations

import json
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
from trainer.evaluate import kl_to_reference
from trainer.logprobs import encode
from trainer.model import weight_dtype


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m trainer.probe PROBE.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    world, device = init_world(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"), spec.get("engine", "ddp")
    )
    try:
        dtype = weight_dtype(spec.get("dtype", "auto"), device)
        base, tokenizer = load_base_for(
            world, spec["base_model"], device, dtype, spec.get("quantize")
        )
        model = PeftModel.from_pretrained(base, spec["adapter"], adapter_name="served")
        if world.sharded:
            shard_model(model, world, device)
        examples = [encode(tokenizer, e["prompt"], e["response"]) for e in spec["examples"]]
        kl = kl_to_reference(model, examples, adapter="served", pad_id=tokenizer.pad_token_id)
        held, total = held_parameters(model)  # this process's share of the weights
        if world.is_main:
            out = {"kl_to_reference": kl, "n": len(examples), "processes": world.size,
                   "parameters_held": held, "parameters": total}  # fmt: skip
            Path(args[1]).write_text(json.dumps(out))
    finally:
        close_world()
    return 0


if __name__ == "__main__":
    sys.exit(main())
