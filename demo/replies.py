"""``python -m demo.replies SPEC.json OUT.json`` — the SFT model's replies to prompts.

Spec: ``{"base_model", "prompts": [messages...], "max_new_tokens", "batch_size",
"adapter": optional}``. Output: ``{"replies": [...]}`` in prompt order. Greedy decoding, so
the same spec always gives the same replies; callers cache the output by the spec's hash.
Used by the feedback simulator to get real production-like replies from SmolLM2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from tqdm import tqdm

from trainer.generation import generate
from trainer.model import load_base


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m demo.replies SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    model, tokenizer = load_base(spec.get("base_model", "smollm2"), torch.device("cpu"))
    adapter = None
    if spec.get("adapter"):
        model = PeftModel.from_pretrained(model, spec["adapter"], adapter_name="served")
        adapter = "served"
    prompts = spec["prompts"]
    batch = int(spec.get("batch_size", 16))
    replies: list[str] = []
    for start in tqdm(
        range(0, len(prompts), batch), desc="generating replies", unit="batch", file=sys.stderr
    ):
        replies += generate(
            model,
            tokenizer,
            prompts[start : start + batch],
            adapter=adapter,
            max_new_tokens=int(spec.get("max_new_tokens", 96)),
            batch_size=batch,
        )
    Path(args[1]).write_text(json.dumps({"replies": replies}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
