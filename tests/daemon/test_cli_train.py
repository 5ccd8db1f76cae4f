"""`alignd train` through the real console script, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ALIGND = [sys.executable, "-m", "daemon.cli"]


def test_alignd_train_end_to_end(
    child_processes: None, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *ALIGND,
            "train",
            "--data",
            str(pairs_file),
            "--out",
            str(out),
            "--base-model",
            str(tiny_model_dir),
            "--max-steps",
            "4",
            "--lr",
            "0.01",
            "--set",
            "eval.factuality_set=null",
            "--set",
            "hyper.warmup_ratio=0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "status: succeeded" in proc.stdout
    assert "loss" in proc.stdout and "tokens/s" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    spec = json.loads((out / "run.json").read_text())
    assert spec["hyper"]["max_steps"] == 4 and spec["hyper"]["warmup_ratio"] == 0


def test_alignd_train_bad_option_names_the_field(
    child_processes: None, pairs_file: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [*ALIGND, "train", "--data", str(pairs_file), "--out", str(tmp_path / "o"), "--beta", "-2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "hyper.beta" in proc.stderr
    assert not (tmp_path / "o").exists()
