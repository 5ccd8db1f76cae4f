"""A refresh checks its memory plan before it starts a training Job, and refuses one that
cannot fit its GPUs, naming what to change (``trainer.plan``); the registry stays as it was.
No cluster here: the Job runner is replaced by one that records being called (the refusal must
come before it)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import agent_edits, in_process_service

from daemon.config import AligndConfig
from daemon.refresh import job_plan_refusal
from daemon.runners import RunEnd
from daemon.service import Service
from daemon.states import Outcome, RefreshTrigger
from trainer.spec import RunSpec

SEVENTY_B = {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256}  # fmt: skip


def spec(base_model: str, *, engine: str = "ddp", quantize: str | None = None,
         **hyper: Any) -> RunSpec:  # fmt: skip
    return RunSpec.model_validate(
        {
            "data": __file__,
            "output_dir": "o",
            "base_model": base_model,
            "hyper": hyper,
            "engine": engine,
            "lora": {"quantize": quantize},
        }
    )


def k8s(gpus: int = 1, memory: float = 80.0) -> AligndConfig:
    return AligndConfig(
        training={"runner": "kubernetes", "kubernetes": {"gpus": gpus, "gpu_memory_gib": memory}}
    )


def test_a_job_that_cannot_fit_is_refused_naming_what_to_change(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SEVENTY_B))
    big = spec(str(tmp_path), batch_size=8, max_length=2048)
    message = job_plan_refusal(big, k8s().training)
    assert message.startswith("the plan does not fit: ")
    assert "training.kubernetes.gpus" in message and "fsdp on" in message
    assert job_plan_refusal(spec("smollm2"), k8s().training) == ""  # fits one 80 GiB GPU
    assert job_plan_refusal(big, AligndConfig().training) == ""  # local runner: not a Job
    assert job_plan_refusal(big, k8s(gpus=0).training) == ""  # a CPU Job
    assert job_plan_refusal(spec(str(tmp_path / "nowhere")), k8s().training) == ""  # unknown
    # the run's own engine and quantisation are what is planned
    sharded = {"batch_size": 8, "max_length": 2048, "activation_checkpointing": 1}
    assert "run_spec.engine: fsdp" in job_plan_refusal(spec(str(tmp_path), **sharded),
                                                       k8s(gpus=8).training)  # fmt: skip
    assert job_plan_refusal(spec(str(tmp_path), engine="fsdp", **sharded),
                            k8s(gpus=8).training) == ""  # fmt: skip
    small = {"batch_size": 1, "max_length": 1024, "activation_checkpointing": 1}
    assert job_plan_refusal(spec(str(tmp_path), **small), k8s().training) != ""
    assert job_plan_refusal(spec(str(tmp_path), quantize="nf4", **small), k8s().training) == ""


class RecordingRunner:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, run_id: str, spec_path: Path, stop: threading.Event, timeout_s: float) -> RunEnd:
        self.calls.append(run_id)
        raise AssertionError("a refused plan must not start a Job")


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[Service]:
    with in_process_service(tmp_path, training={"min_pairs": 4}) as svc:
        yield svc


def test_the_refresh_refuses_before_the_job_starts(service: Service) -> None:
    service.store.write_batch(agent_edits(0, 40))
    refresher, runner = service.refresher, RecordingRunner()
    refresher.config = refresher.config.model_copy(
        update={"training": k8s(memory=0.5).training.model_copy(update={"min_pairs": 4})}
    )
    refresher.runner = runner
    outcome = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert outcome.outcome == Outcome.FAILED, outcome
    assert outcome.reason.startswith("the plan does not fit: ") and "GiB" in outcome.reason
    assert runner.calls == [] and service.registry.versions() == []


def test_fsdp_without_a_multi_gpu_job_is_refused_at_start_up() -> None:
    from pydantic import ValidationError

    for training in (
        {"run_spec": {"engine": "fsdp"}},  # the local runner trains in one process
        {"run_spec": {"engine": "fsdp"}, "runner": "kubernetes", "kubernetes": {"gpus": 1}},
    ):
        with pytest.raises(ValidationError, match=r"run_spec\.engine: fsdp .*gpus of 2 or more"):
            AligndConfig(training=training)
    ok = AligndConfig(training={"run_spec": {"engine": "fsdp"}, "runner": "kubernetes",
                                "kubernetes": {"gpus": 2}})  # fmt: skip
    assert ok.training.run_spec["engine"] == "fsdp"
    with pytest.raises(ValidationError, match=r"run_spec\.engine: fsdp .*lora\.quantize"):
        AligndConfig(training={"run_spec": {"engine": "fsdp", "lora": {"quantize": "nf4"}},
                               "runner": "kubernetes", "kubernetes": {"gpus": 2}})  # fmt: skip


def test_a_bad_plain_run_spec_field_names_its_key_at_start_up() -> None:
    from pydantic import ValidationError

    for key, value in (("engine", "zero3"), ("dtype", "bf17"), ("method", "ppo"), ("seed", "x")):
        with pytest.raises(ValidationError, match=rf"run_spec|{key}: "):
            AligndConfig(training={"run_spec": {key: value}})
        try:
            AligndConfig(training={"run_spec": {key: value}})
        except ValidationError as e:
            assert f"{key}: " in str(e), str(e)
    assert AligndConfig(training={"run_spec": {"dtype": "bf16", "seed": 3}}).training.run_spec
