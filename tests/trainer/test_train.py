"""The training entry point end to end on a tiny random Llama (seconds per run).

Each failure detector is provoked by a real run with the fault it guards against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.train as train_mod
from trainer import losses as L
from trainer import objectives
from trainer.logprobs import collate, encode, sequence_logps
from trainer.spec import RunSpec
from trainer.train import main, run

FAST_EVAL = {
    "factuality_limit": 8,
    "generate_max_prompts": 2,
    "max_new_tokens": 8,
    "kl_max_examples": 4,
    "retain_max_new_tokens": 8,
}


def make_spec(tmp_path: Path, model_dir: Path, data: Path, **overrides: Any) -> RunSpec:
    raw: dict[str, Any] = {
        "data": str(data),
        "output_dir": str(tmp_path / "out"),
        "base_model": str(model_dir),
        "hyper": {"max_steps": 6, "learning_rate": 1e-2, "batch_size": 4, "warmup_ratio": 0.0},
        "eval": FAST_EVAL,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = raw[key] | value
        else:
            raw[key] = value
    return RunSpec.model_validate(raw)


def test_dpo_run_learns_saves_a_servable_adapter_and_reports(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        tmp_path, tiny_model_dir, pairs_file, eval_data=str(pairs_file), hyper={"max_steps": 12}
    )
    spec.output_dir.mkdir(parents=True)
    (tmp_path / "run.json").write_text(spec.model_dump_json())
    assert main([str(tmp_path / "run.json")]) == 0

    result = json.loads((spec.output_dir / "result.json").read_text())
    assert result["status"] == "succeeded"
    steps = result["steps"]
    assert len(steps) == 12
    assert steps[0]["loss"] == pytest.approx(
        math.log(2), abs=1e-4
    )  # fresh adapter: policy == reference
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "kl_proxy",
        "grad_norm",
        "learning_rate",
        "tokens_per_s",
    ):
        assert all(math.isfinite(s[key]) for s in steps), key
    first, last = sum(s["loss"] for s in steps[:3]) / 3, sum(s["loss"] for s in steps[-3:]) / 3
    assert last < first - 0.05
    assert result["detectors"]["reference_mismatch"]["fired"] is False
    assert result["detectors"]["sign_bug"]["fired"] is False
    assert result["eval"]["candidate"]["preference"]["reward_accuracy"] >= 0.75
    assert result["eval"]["candidate"]["kl_to_reference"] > 0
    assert result["eval"]["reference"]["kl_to_reference"] == 0
    assert 0 <= result["eval"]["reference"]["factuality"] <= 1
    assert result["peak_memory_bytes"]["rss_bytes"] > 0
    assert json.loads((spec.output_dir / "run.json").read_text())["hyper"]["max_steps"] == 12

    adapter_dir = spec.output_dir / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["bias"] == "none" and not config.get("modules_to_save")
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    # Reloaded with plain peft, the adapter changes the model's log-probs; the base does not.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = collate(
        [encode(tokenizer, "Where is my order 1234?", "Order 1234 ships today.")],
        tokenizer.pad_token_id,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = sequence_logps(base, batch).item()
        reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
        after = sequence_logps(reloaded, batch).item()
    assert after > before + 0.01  # the chosen reply became more likely


@pytest.mark.parametrize(
    "method", ["dpo", "cdpo", "ipo", "hinge", "robust", "dpop", "simpo", "orpo", "rpo"]
)
def test_every_paired_method_trains(
    method: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    hyper = {"max_steps": 3, "label_smoothing": 0.1 if method in {"cdpo", "robust"} else 0.0}
    result = run(
        make_spec(
            tmp_path,
            tiny_model_dir,
            pairs_file,
            method=method,
            hyper=hyper,
            eval={"factuality_set": None},
        )
    )
    assert result.status == "succeeded", result.error
    assert all(s.loss is not None and math.isfinite(s.loss) for s in result.steps)


@pytest.mark.parametrize("method", ["kto", "apo_zero"])
@pytest.mark.parametrize("labels", [[True, False], [True], [False]])
def test_unpaired_methods_train_even_with_one_class(
    method: str, labels: list[bool], tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = [
        {
            "prompt": f"Question {i}?",
            "completion": f"Answer number {i}.",
            "label": labels[i % len(labels)],
        }
        for i in range(8)
    ]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(
        make_spec(
            tmp_path,
            tiny_model_dir,
            data,
            method=method,
            hyper={"max_steps": 3},
            eval={"factuality_set": None},
        )
    )
    assert result.status == "succeeded", result.error
    assert all(s.loss is not None and math.isfinite(s.loss) for s in result.steps)
    if method == "kto":
        assert all((s.kl_estimate or 0.0) >= 0 for s in result.steps)


def test_kto_learns_from_pairs_split_into_rows(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    result = run(
        make_spec(
            tmp_path,
            tiny_model_dir,
            pairs_file,
            method="kto",
            hyper={"max_steps": 8},
            eval={"factuality_set": None},
        )
    )
    assert result.status == "succeeded", result.error
    assert result.num_train_examples == 2 * 16
    last = result.steps[-1]
    assert last.reward_chosen is not None and last.reward_rejected is not None
    assert last.reward_chosen > last.reward_rejected


def test_non_finite_loss_aborts_and_writes_no_adapter(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    # A learning rate of 1e30 blows the LoRA weights up after the first update.
    spec = make_spec(
        tmp_path, tiny_model_dir, pairs_file, hyper={"learning_rate": 1e30, "max_grad_norm": 1e38}
    )
    result = run(spec)
    assert result.status == "failed"
    assert result.detectors["non_finite_loss"]["fired"] is True
    assert "loss is" in (result.error or "")
    assert not (spec.output_dir / "adapter").exists()


def test_reference_mismatch_aborts_at_step_zero(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fault: reference log-probs that do not come from the policy's own base (e.g. a
    # stale cache from another model): here, off by up to ±1 nat per sequence.
    real = train_mod.reference_logps
    noise = torch.Generator().manual_seed(0)

    def mismatched(*args: Any, **kwargs: Any) -> torch.Tensor:
        logps = real(*args, **kwargs)
        return logps + 2 * torch.rand(logps.shape, generator=noise) - 1

    monkeypatch.setattr(train_mod, "reference_logps", mismatched)
    result = run(make_spec(tmp_path, tiny_model_dir, pairs_file))
    assert result.status == "failed"
    assert result.detectors["reference_mismatch"]["fired"] is True
    assert "reference does not match" in (result.error or "")
    assert len(result.steps) == 1


def test_half_precision_checks_the_reference_per_token(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16: the step-0 check is the mean |log π − log π_ref| per token (half precision alone
    # moves the loss off log 2 on a real model: test_smollm2). A reference from another base,
    # here off by up to ±1 nat per token, still stops the run at step 0.
    clean = run(make_spec(tmp_path / "clean", tiny_model_dir, pairs_file, dtype="bf16"))
    assert clean.status == "succeeded", clean.error
    finding = clean.detectors["reference_mismatch"]
    assert finding["fired"] is False and 0 <= finding["value"] < 0.05
    real = train_mod.reference_logps
    noise = torch.Generator().manual_seed(0)

    def mismatched(model: Any, examples: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        logps = real(model, examples, *args, **kwargs)
        tokens = torch.tensor([float(len(e.response_ids)) for e in examples])
        return logps + (2 * torch.rand(logps.shape, generator=noise) - 1) * tokens

    monkeypatch.setattr(train_mod, "reference_logps", mismatched)
    result = run(make_spec(tmp_path / "bad", tiny_model_dir, pairs_file, dtype="bf16"))
    assert result.status == "failed"
    assert result.detectors["reference_mismatch"]["fired"] is True
    assert "nats per token" in (result.error or "") and len(result.steps) == 1


def test_swapped_loss_arguments_are_flagged_as_a_sign_bug(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fault: a caller passing rejected where chosen belongs.
    real = L.dpo_loss

    def swapped(
        pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, **kw: Any
    ) -> L.PairLoss:
        return real(pr, pc, rr, rc, **kw)

    monkeypatch.setattr(objectives.L, "dpo_loss", swapped)
    result = run(make_spec(tmp_path, tiny_model_dir, pairs_file, hyper={"max_steps": 8}))
    assert result.detectors["sign_bug"]["fired"] is True
    assert result.detectors["sign_bug"]["value"] < 0


def test_sign_bug_not_flagged_on_correct_training(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    result = run(make_spec(tmp_path, tiny_model_dir, pairs_file, hyper={"max_steps": 8}))
    assert result.detectors["sign_bug"]["fired"] is False


def repetitive_pairs(tmp_path: Path) -> Path:
    """Chosen: a short answer. Rejected: the same answer rambling on, repeated four times.

    Plain DPO widens the margin here by making the answer's own tokens less likely, the
    chosen response included (measured: −6.0 → −6.3 nats/token over 30 steps).
    """
    rows = []
    for i in range(16):
        chosen = f"Order {1000 + i} ships today."
        rows.append(
            {
                "prompt": f"Where is order {1000 + i}?",
                "chosen": chosen,
                "rejected": " ".join([chosen] * 4),
            }
        )
    path = tmp_path / "repetitive.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("method", "fired"), [("dpo", True), ("dpop", False)])
def test_likelihood_collapse_detected_for_dpo_not_dpop(
    method: str, fired: bool, tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        tmp_path,
        tiny_model_dir,
        repetitive_pairs(tmp_path),
        method=method,
        hyper={"max_steps": 30, "lr_scheduler": "constant"},
        lora={"r": 32, "dropout": 0.0},
        eval={"factuality_set": None},
    )
    result = run(spec)
    assert result.status == "succeeded"
    assert result.detectors["likelihood_collapse"]["fired"] is fired, result.detectors[
        "likelihood_collapse"
    ]


def test_a_supervised_pass_trains_on_chosen_nll_before_the_preference_loss(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        tmp_path,
        tiny_model_dir,
        pairs_file,
        method="dpo",
        hyper={"max_steps": 2, "sft_epochs": 1.0},
        eval={"factuality_set": None},
    )
    result = run(spec)
    assert result.status == "succeeded"
    assert len(result.steps) > 2  # a pass over the training rows, then the 2 preference steps
    first, last = result.steps[0], result.steps[-1]
    # the supervised steps' loss is the chosen reply's NLL, the preference steps' is DPO's
    assert first.logp_chosen_per_token is not None
    assert first.loss == pytest.approx(-first.logp_chosen_per_token, rel=1e-4)
    assert last.loss == pytest.approx(last.preference_loss, rel=1e-4)
    assert first.loss != pytest.approx(first.preference_loss, rel=1e-2)


def test_warm_start_keeps_the_sft_model_as_reference(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    first = run(
        make_spec(tmp_path / "a", tiny_model_dir, pairs_file, eval={"factuality_set": None})
    )
    assert first.status == "succeeded"
    second = run(
        make_spec(
            tmp_path / "b",
            tiny_model_dir,
            pairs_file,
            init_adapter=first.adapter_dir,
            hyper={"max_steps": 1, "learning_rate": 1e-12},
            eval={"factuality_set": None},
        )
    )
    assert second.status == "succeeded"
    # Were the warm-start adapter the reference, step-0 rewards would be exactly 0.
    assert second.steps[0].reward_margin > 0.01
    assert "reference_mismatch" not in second.detectors  # not checkable with a warm start


def test_incumbent_is_evaluated_on_the_same_heldout(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    first = run(
        make_spec(tmp_path / "a", tiny_model_dir, pairs_file, eval={"factuality_set": None})
    )
    second = run(
        make_spec(
            tmp_path / "b",
            tiny_model_dir,
            pairs_file,
            eval_data=str(pairs_file),
            incumbent_adapter=first.adapter_dir,
            eval={"factuality_set": None},
        )
    )
    assert second.status == "succeeded", second.error
    evaluation = second.eval.model_dump(exclude_none=True)  # as result.json holds it
    assert set(evaluation) == {"candidate", "incumbent", "reference"}
    assert (
        evaluation["incumbent"]["preference"]["num_pairs"]
        == evaluation["candidate"]["preference"]["num_pairs"]
    )
    assert evaluation["incumbent"]["kl_to_reference"] > 0


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"hyper": {"beta": -1}}, "hyper.beta"),
        ({"hyper": {"betta": 0.1}}, "hyper.betta"),
        ({"method": "ppo"}, "method"),
        ({"data": "/nonexistent/pairs.jsonl"}, "data"),
        ({"method": "cdpo"}, "label_smoothing"),
    ],
)
def test_bad_spec_fails_before_loading_the_model_naming_the_field(
    patch: dict[str, Any],
    field: str,
    tmp_path: Path,
    pairs_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw: dict[str, Any] = {
        "data": str(pairs_file),
        "output_dir": str(tmp_path / "out"),
        "base_model": "/nonexistent/model",
    }
    for key, value in patch.items():
        raw[key] = value
    (tmp_path / "run.json").write_text(json.dumps(raw))
    assert main([str(tmp_path / "run.json")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_missing_model_is_a_failed_run_with_a_result(tmp_path: Path, pairs_file: Path) -> None:
    spec = RunSpec.model_validate(
        {
            "data": str(pairs_file),
            "output_dir": str(tmp_path / "out"),
            "base_model": "/nonexistent/model",
        }
    )
    result = run(spec)
    assert result.status == "failed" and "neither" in (result.error or "")
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "failed"


def test_activation_checkpointing_changes_memory_not_the_math(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    lora = {"dropout": 0.0}  # dropout masks would differ between the forward and its recompute
    plain = run(make_spec(tmp_path / "a", tiny_model_dir, pairs_file, lora=lora))
    recomputed = run(
        make_spec(
            tmp_path / "b",
            tiny_model_dir,
            pairs_file,
            lora=lora,
            hyper={"activation_checkpointing": 1},
        )
    )
    assert plain.status == recomputed.status == "succeeded"
    for a, b in zip(plain.steps, recomputed.steps, strict=True):
        assert b.loss == pytest.approx(a.loss, abs=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)


def test_activation_checkpointing_is_switched_on_through_the_peft_wrapper(
    tiny_model_dir: Path,
) -> None:
    from trainer.model import attach_lora, enable_activation_checkpointing
    from trainer.spec import LoraSpec

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSpec())
    assert not model.get_base_model().is_activation_checkpointing
    enable_activation_checkpointing(model, 0)
    assert not model.get_base_model().is_activation_checkpointing
    enable_activation_checkpointing(model, 1)
    assert model.get_base_model().is_activation_checkpointing


def test_bf16_weights_train_like_fp32_with_fp32_adapter_and_losses(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """``dtype: bf16`` on CPU: the base's weights in bf16, the LoRA weights (so gradients and
    Adam state) in fp32, the losses in fp32. Per-step losses stay within 0.02 of an fp32 run on
    the same data and seed (bf16 keeps 8 bits of mantissa: ~3 significant digits per
    activation), none is NaN, and the reference pass is cached under its own precision."""
    cache = tmp_path / "ref.sqlite"
    lora, data = {"dropout": 0.0}, {"eval_data": str(pairs_file)}
    fp32 = run(make_spec(tmp_path / "a", tiny_model_dir, pairs_file, lora=lora,
                         reference_cache=str(cache), **data))  # fmt: skip
    seen: dict[str, Any] = {}
    original = train_mod.attach_lora

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        wrapped = original(model, *args, **kwargs)
        seen["base"] = {p.dtype for n, p in wrapped.named_parameters() if "lora_" not in n}
        seen["lora"] = {p.dtype for n, p in wrapped.named_parameters() if "lora_" in n}
        return wrapped

    train_mod.attach_lora = spy
    try:
        bf16 = run(make_spec(tmp_path / "b", tiny_model_dir, pairs_file, lora=lora, dtype="bf16",
                             reference_cache=str(cache), **data))  # fmt: skip
    finally:
        train_mod.attach_lora = original
    assert fp32.status == bf16.status == "succeeded"
    assert seen == {"base": {torch.bfloat16}, "lora": {torch.float32}}
    assert bf16.reference_logps["computed"] > 0  # not served from the fp32 run's cache rows
    assert bf16.steps[0].loss == pytest.approx(math.log(2), abs=1e-3)  # policy == reference
    for a, b in zip(fp32.steps, bf16.steps, strict=True):
        assert b.loss is not None and b.grad_norm is not None
        assert math.isfinite(b.loss) and math.isfinite(b.grad_norm)
        assert b.loss == pytest.approx(a.loss, abs=0.02)
    assert bf16.steps[-1].loss < bf16.steps[0].loss  # it learns
    assert bf16.eval.candidate.kl_to_reference is not None
    assert bf16.eval.candidate.kl_to_reference == pytest.approx(
        fp32.eval.candidate.kl_to_reference, abs=0.01
    )


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu() -> None:
    from trainer.model import weight_dtype

    assert weight_dtype("auto", torch.device("cpu")) == torch.float32
    assert weight_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert weight_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        RunSpec.model_validate({"data": "x", "output_dir": "y", "dtype": "int8"})
