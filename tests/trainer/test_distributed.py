"""Multi-process training under torchrun, 2 CPU processes on the gloo backend: data parallel
(DDP) and sharded (FSDP2) runs give the same per-step losses, gradient norms and adapter as
one process with the same global batch, and exactly one adapter; KTO's baseline too. The FSDP run also evaluates
(held-out preference, KL, greedy replies, an incumbent adapter) and hits the reference cache
under sharding, where every scoring forward is a collective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from trainer.spec import RunSpec

ENV = os.environ | {"OMP_NUM_THREADS": "1"}
STDERR_TAIL = 12_000  # enough for every process's traceback, not only the last one
HYPER = {"max_steps": 5, "learning_rate": 1e-2, "batch_size": 4, "grad_accum": 2, "warmup_ratio": 0}


def spec_file(tmp_path: Path, name: str, model: Path, data: Path, **extra: Any) -> Path:
    spec = RunSpec.model_validate(
        {
            "data": str(data),
            "output_dir": str(tmp_path / name),
            "base_model": str(model),
            "seed": 3,
            "hyper": HYPER,
            # LoRA dropout draws different masks when a batch is split across ranks; without it
            # the two runs compute the same function.
            "lora": {"dropout": 0.0},
            "eval": {"factuality_set": None, "generate_max_prompts": 0},
        }
        | extra
    )
    path = tmp_path / f"{name}.json"
    path.write_text(spec.model_dump_json())
    return path


def train(spec: Path, processes: int = 1) -> dict[str, Any]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "trainer.train"]
    done = subprocess.run(
        [*command, str(spec)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-STDERR_TAIL:]
    result: dict[str, Any] = json.loads((spec.parent / spec.stem / "result.json").read_text())
    assert result["status"] == "succeeded"
    return result


def assert_same_training(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [s["loss"] for s in b["steps"]] == pytest.approx(
        [s["loss"] for s in a["steps"]], abs=1e-4
    )
    assert [s["grad_norm"] for s in b["steps"]] == pytest.approx(
        [s["grad_norm"] for s in a["steps"]], rel=1e-3
    )
    assert b["steps"][-1]["tokens"] == a["steps"][-1]["tokens"]  # every rank's tokens counted


def adapter_weights(run: Path) -> dict[str, Any]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_two_processes_match_one(
    child_processes: None, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    a = train(spec_file(tmp_path, "single", tiny_model_dir, pairs_file))
    b = train(spec_file(tmp_path, "ddp", tiny_model_dir, pairs_file), processes=2)
    assert_same_training(a, b)
    assert b["parallel"]["engine"] == "ddp"
    assert b["parallel"]["parameters_held"] == b["parallel"]["parameters"]  # a whole copy each
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "adapter",
        "result.json",
        "run.json",
    ]
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_shards_the_base_and_matches_one_process(
    child_processes: None, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    incumbent = tmp_path / "incumbent"
    train(spec_file(tmp_path, "incumbent", tiny_model_dir, pairs_file, seed=7))
    evaluated = {
        "eval_data": str(pairs_file),
        "incumbent_adapter": str(incumbent / "adapter"),
        "reference_cache": str(tmp_path / "reference.sqlite"),
        "eval": {"factuality_set": None, "generate_max_prompts": 3, "max_new_tokens": 6},
    }
    a = train(spec_file(tmp_path, "single", tiny_model_dir, pairs_file, **evaluated))
    # activation checkpointing under sharding recomputes each layer (re-gathering it): same math
    checkpointed = HYPER | {"activation_checkpointing": 1}
    b = train(
        spec_file(
            tmp_path,
            "fsdp",
            tiny_model_dir,
            pairs_file,
            engine="fsdp",
            hyper=checkpointed,
            # its own cache file: the sharded run computes its own reference
            **(evaluated | {"reference_cache": str(tmp_path / "fsdp-reference.sqlite")}),
        ),
        processes=2,
    )
    assert_same_training(a, b)
    # sharded: each process holds about half the layers' weights (the tied embedding is whole)
    parallel = b["parallel"]
    assert parallel["engine"] == "fsdp" and parallel["processes"] == 2
    assert parallel["parameters_held"] < 0.75 * parallel["parameters"], parallel
    assert parallel["parameters"] == a["parallel"]["parameters"]
    # one adapter, gathered whole from the shards, equal to the single process's
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == [
        "adapter",
        "result.json",
        "run.json",
    ]
    wa, wb = adapter_weights(tmp_path / "single"), adapter_weights(tmp_path / "fsdp")
    assert sorted(wb) == sorted(wa)
    for key, value in wa.items():
        assert wb[key].shape == value.shape
        assert (wb[key] - value).abs().max().item() < 1e-4, key
    # evaluation under sharding: the same numbers for candidate, incumbent and reference
    for name in ("candidate", "incumbent", "reference"):
        ea, eb = a["eval"][name], b["eval"][name]
        assert eb["preference"]["num_pairs"] == ea["preference"]["num_pairs"] == 16
        for key in ("chosen_logps", "chosen_logps_per_token", "rejected_logps_per_token"):
            assert eb["preference"][key] == pytest.approx(ea["preference"][key], abs=1e-3)
        assert eb["kl_to_reference"] == pytest.approx(ea["kl_to_reference"], abs=1e-5)
        assert eb["generation"]["num_replies"] == ea["generation"]["num_replies"] == 3
        assert eb["generation"]["replies"] == ea["generation"]["replies"]  # greedy, same weights
    assert a["eval"]["incumbent"]["kl_to_reference"] != a["eval"]["candidate"]["kl_to_reference"]
    # the reference pass went through the cache on every rank: as one process, then all hits
    assert b["reference_logps"] == a["reference_logps"] and b["reference_logps"]["computed"] > 0
    c = train(
        spec_file(tmp_path, "fsdp2", tiny_model_dir, pairs_file, engine="fsdp", **evaluated),
        processes=2,
    )
    assert c["reference_logps"]["computed"] == 0
    assert c["reference_logps"]["hits"] >= a["reference_logps"]["computed"]
    assert_same_training(b, c)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_kto_baseline_is_the_global_batch_mean(
    child_processes: None, engine: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """KTO's z0 (the KL baseline) is a mean over the whole micro-batch: a rank's own rows alone
    would give each process a different baseline and a different loss."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    thumbs = tmp_path / "thumbs.jsonl"
    thumbs.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"})
            + "\n"
            for r in rows
            for key in ("chosen", "rejected")
        )
    )
    kto = {"method": "kto", "hyper": HYPER | {"max_steps": 3, "grad_accum": 1}}
    a = train(spec_file(tmp_path, "single", tiny_model_dir, thumbs, **kto))
    b = train(
        spec_file(tmp_path, engine, tiny_model_dir, thumbs, engine=engine, **kto), processes=2
    )
    assert any(s["kl_estimate"] > 0 for s in a["steps"])  # the baseline is in play
    assert [s["kl_estimate"] for s in b["steps"]] == pytest.approx(
        [s["kl_estimate"] for s in a["steps"]], abs=1e-4
    )
    assert_same_training(a, b)


def test_the_drift_probe_shards_like_training(
    child_processes: None, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """``python -m trainer.probe`` under torchrun with engine fsdp: the same drift as one
    process (generating the reference's retain replies sharded too)."""
    train(spec_file(tmp_path, "adapter", tiny_model_dir, pairs_file))
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                              for r in map(json.loads, pairs_file.read_text().splitlines()[:6])))  # fmt: skip
    kls = {}
    for engine, processes in (("ddp", 1), ("fsdp", 2)):
        probe = tmp_path / f"probe-{engine}.json"
        out = tmp_path / f"out-{engine}.json"
        probe.write_text(json.dumps({"base_model": str(tiny_model_dir), "engine": engine,
                                     "adapter": str(tmp_path / "adapter" / "adapter"),
                                     "retain_set": str(retain), "max_new_tokens": 8}))  # fmt: skip
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [sys.executable, *(launcher if processes > 1 else []), "-m", "trainer.probe"]
        done = subprocess.run(
            [*command, str(probe), str(out)], capture_output=True, text=True, env=ENV, timeout=300
        )
        assert done.returncode == 0, done.stderr[-STDERR_TAIL:]
        kls[engine] = json.loads(out.read_text())
    assert kls["fsdp"]["num_replies"] == kls["ddp"]["num_replies"] == 6
    sharded, whole = kls["fsdp"], kls["ddp"]
    assert sharded["processes"] == 2 and sharded["parameters"] == whole["parameters"]
    assert sharded["parameters_held"] < 0.75 * whole["parameters_held"]
    assert kls["ddp"]["nats_per_reply"] > 0
    assert kls["fsdp"]["nats_per_reply"] == pytest.approx(kls["ddp"]["nats_per_reply"], rel=1e-4)
