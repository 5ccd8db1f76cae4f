"""Data-parallel training under torchrun: 2 CPU processes on the gloo backend give the same
per-step losses as one process with the same global batch, and exactly one adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.spec import RunSpec


def spec_file(tmp_path: Path, name: str, model: Path, data: Path) -> Path:
    spec = RunSpec.model_validate(
        {
            "data": str(data),
            "output_dir": str(tmp_path / name),
            "base_model": str(model),
            "seed": 3,
            "hyper": {
                "max_steps": 5,
                "learning_rate": 1e-2,
                "batch_size": 4,
                "grad_accum": 2,
                "warmup_ratio": 0,
            },
            # LoRA dropout draws different masks when a batch is split across ranks; without it
            # the two runs compute the same function.
            "lora": {"dropout": 0.0},
            "eval": {"factuality_set": None, "generate_max_prompts": 0},
        }
    )
    path = tmp_path / f"{name}.json"
    path.write_text(spec.model_dump_json())
    return path


def test_two_processes_match_one(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    single = spec_file(tmp_path, "single", tiny_model_dir, pairs_file)
    double = spec_file(tmp_path, "ddp", tiny_model_dir, pairs_file)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "trainer.train", str(single)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "trainer.train",
            str(double),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "single" / "result.json").read_text())
    b = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert b["status"] == "succeeded"
    losses_a, losses_b = [s["loss"] for s in a["steps"]], [s["loss"] for s in b["steps"]]
    assert losses_b == pytest.approx(losses_a, abs=1e-4)
    assert [s["grad_norm"] for s in b["steps"]] == pytest.approx(
        [s["grad_norm"] for s in a["steps"]], rel=1e-3
    )
    assert b["steps"][-1]["tokens"] == a["steps"][-1]["tokens"]  # every rank's tokens counted
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "adapter",
        "result.json",
        "run.json",
    ]
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
