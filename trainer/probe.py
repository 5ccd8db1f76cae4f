"""``python -m trainer.probe PROBE.json OUT.json`` — KL drift of a served adapter.

Input: ``{"base_model", "adapter", "examples": [{"prompt", "response"}]}`` — recent production
prompts with the replies actually served. Output: ``{"kl_to_reference": nats/token, "n": ...}``,
the teacher-forced KL(adapter ‖ reference) exact over the vocabulary. Run as a child process
by the daemon so the model never lives in the daemon's memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

from trainer.evaluate import kl_to_reference
from trainer.logprobs import encode
from trainer.model import load_base


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m trainer.probe PROBE.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    base, tokenizer = load_base(spec["base_model"], torch.device("cpu"))
    model = PeftModel.from_pretrained(base, spec["adapter"], adapter_name="served")
    examples = [encode(tokenizer, e["prompt"], e["response"]) for e in spec["examples"]]
    kl = kl_to_reference(model, examples, adapter="served", pad_id=tokenizer.pad_token_id)
    Path(args[1]).write_text(json.dumps({"kl_to_reference": kl, "n": len(examples)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
