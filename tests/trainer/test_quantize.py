"""QLoRA (``lora.quantize: nf4``) needs a CUDA GPU; this machine has none, so what is tested
here is the clear error a CPU machine gives, at the daemon's start-up and at a run's start,
naming the key. (The 4-bit path itself runs only on a GPU: see docs/operations.md, production-size bases.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.config import AligndConfig, cuda_here
from trainer.spec import LoraSpec, RunSpec
from trainer.train import run

pytestmark = pytest.mark.skipif(cuda_here(), reason="these check the error a CPU machine gives")


def test_a_run_on_cpu_fails_at_once_naming_the_key(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    spec = RunSpec.model_validate(
        {
            "data": str(pairs_file),
            "output_dir": str(tmp_path / "out"),
            "base_model": str(tiny_model_dir),
            "lora": {"quantize": "nf4"},
        }
    )
    result = run(spec)
    assert result.status == "failed" and not result.steps
    assert result.error is not None and "lora.quantize: nf4 needs a CUDA GPU" in result.error
    assert not (tmp_path / "out" / "adapter").exists()


def test_the_daemon_refuses_to_start_naming_the_key(child_processes: None) -> None:
    with pytest.raises(ValidationError, match=r"run_spec\.lora\.quantize: nf4 needs a CUDA GPU"):
        AligndConfig(training={"run_spec": {"lora": {"quantize": "nf4"}}})
    with pytest.raises(ValidationError, match=r"training\.kubernetes\.gpus is 0"):
        AligndConfig(
            training={
                "runner": "kubernetes",
                "kubernetes": {"gpus": 0},
                "run_spec": {"lora": {"quantize": "nf4"}},
            }
        )
    # GPU Jobs train elsewhere: the daemon's own machine needs no GPU for them
    config = AligndConfig(
        training={"runner": "kubernetes", "run_spec": {"lora": {"quantize": "nf4"}}}
    )
    assert config.training.run_spec["lora"]["quantize"] == "nf4"


def test_only_nf4_is_a_quantisation() -> None:
    assert LoraSpec(quantize="nf4").quantize == "nf4"
    with pytest.raises(ValidationError, match="quantize"):
        LoraSpec(quantize="int8")  # type: ignore[arg-type]
