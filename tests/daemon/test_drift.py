"""The drift probe's local path end to end: the daemon runs the real ``python -m trainer.probe``
in a bounded child on the tiny model with a real adapter, which measures the gate's drift (the
retain set) and caches the reference's replies where the trainer finds them; the daemon
publishes it (gauge, ``drift.jsonl``). The Job path: ``test_k8s_runner``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from daemon_support import in_process_service
from safetensors.torch import save_file


def lora_adapter(path: Path) -> Path:
    """A LoRA on the tiny model's first q_proj with a non-zero update, so the KL is not 0."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.randn(4, 32, generator=g),
               f"{prefix}.lora_B.weight": torch.randn(32, 4, generator=g)},
              str(path / "adapter_model.safetensors"))  # fmt: skip
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none",
              "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_the_probe_runs_in_a_child_and_publishes_the_kl(
    child_processes: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with in_process_service(tmp_path, training={"base_model": str(tiny_model_dir)}) as service:
        assert service.drift_probe() is None  # nothing active yet
        version = service.registry.register(
            lora_adapter(tmp_path / "adapter"), {"gate": {"promote": True, "reasons": []}}
        )
        service.registry.promote(version, actor="test", reason="setup")
        kl = service.drift_probe()  # needs no production traffic: the retain set is shipped
        assert kl is not None and kl > 0
        assert list((tmp_path / "data" / "cache").glob("reference-replies-*.json"))
        assert service.metrics.drift_kl._value.get() == kl
        [entry] = [json.loads(line) for line in (tmp_path / "data" / "drift.jsonl").open()]
        assert entry["version"] == version and entry["kl"] == kl
        assert service.metrics.drift_probe_failures.labels(reason="failed")._value.get() == 0


def test_without_a_retain_set_there_is_nothing_to_probe(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    training = {"base_model": str(tiny_model_dir), "run_spec": {"eval": {"retain_set": None}}}
    with in_process_service(tmp_path, training=training) as service:
        version = service.registry.register(
            lora_adapter(tmp_path / "adapter"), {"gate": {"promote": True, "reasons": []}}
        )
        service.registry.promote(version, actor="test", reason="setup")
        assert service.drift_probe() is None
