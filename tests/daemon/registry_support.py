"""A small but real PEFT-format adapter directory for registry tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_adapter(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
                4, 32, generator=g
            ),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
        },
        str(path / "adapter_model.safetensors"),
    )
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "bias": "none",
                "target_modules": ["q_proj"],
                "modules_to_save": None,
            }
        )
    )
    return path
