"""The memory planner's arithmetic (table-tested against the models' own parameter counts and
hand-computed bytes), its recommendations and its refusal; ``alignd plan``'s exit codes. Its
estimates against measured peaks: ``bench/plan_accuracy.py``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.cli import main
from trainer.plan import GIB, NF4_BYTES, PRESETS, PlanInput, model_shape, plan, recommend, refusal

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    ("preset", "published"),
    [("smollm2-135m", 134_515_008), ("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496)],
)
def test_presets_have_the_published_parameter_counts(preset: str, published: int) -> None:
    assert PRESETS[preset].params == published


@pytest.mark.parametrize("targets", [ATTENTION, ALL_LINEAR, ("v_proj",)])
def test_counts_match_the_real_model_and_peft(tiny_model_dir: Path, targets: tuple) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.model import attach_lora
    from trainer.spec import LoraSpec

    shape = model_shape(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == model.num_parameters()
    wrapped = attach_lora(model, LoraSpec(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert shape.lora_params(4, targets) == trainable


SMOL = PRESETS["smollm2-135m"]


@pytest.mark.parametrize(
    ("setup", "weights"),
    [
        (PlanInput(SMOL, dtype="fp32"), 4 * SMOL.params),
        (PlanInput(SMOL, dtype="bf16"), 2 * SMOL.params),
        (PlanInput(SMOL, dtype="fp16"), 2 * SMOL.params),
        (
            PlanInput(SMOL, quantize="nf4"),
            SMOL.linear_params * NF4_BYTES + 2 * (SMOL.params - SMOL.linear_params),
        ),
        (
            PlanInput(SMOL, dtype="bf16", engine="fsdp", gpus=4),
            # the head (SmolLM2's is tied to the embedding) whole, the rest in quarters
            (2 * SMOL.params - 2 * SMOL.vocab * SMOL.hidden) / 4
            + 2 * SMOL.vocab * SMOL.hidden
            + 2 * 2 * SMOL.layer_linear_params,
        ),
        (PlanInput(SMOL, dtype="bf16", engine="ddp", gpus=4), 2 * SMOL.params),  # replicated
    ],
)
def test_weight_bytes(setup: PlanInput, weights: float) -> None:
    assert plan(setup).weights == pytest.approx(weights)


def test_lora_optimizer_and_activation_arithmetic() -> None:
    base = PlanInput(SMOL, lora_r=8, targets=ATTENTION, batch=2, seq_len=100, dtype="fp32")
    result = plan(base)
    assert result.lora_optimizer == SMOL.lora_params(8, ATTENTION) * 16
    tokens = 2 * 2 * 100  # two pairs, two sequences each
    compute_precision = 3 * 1536 + 4 * 576  # MLP; queries, keys, values, attention output
    fp32 = 6 * 576 + 4 * 576 + 8 * 4  # residual stream, the four LoRA inputs and middles
    mask = 400**2 * 4  # rows of 1024 tokens hold five 200-token pairs: both share one row
    per_token = compute_precision * 4 + fp32 * 4
    layer = tokens * per_token + mask
    assert result.activations == 30 * layer + 2 * layer  # + one layer's gradients in flight
    checkpointed = plan(PlanInput(**{**base.__dict__, "checkpointing": True}))
    assert checkpointed.activations == 30 * tokens * 576 * 4 + layer + 2 * layer
    assert checkpointed.activations < result.activations / 5
    one_per_row = plan(PlanInput(**{**base.__dict__, "pack_tokens": 200}))
    assert result.activations - one_per_row.activations == (30 + 2) * (400**2 - 2 * 200**2) * 4
    bf16_cpu = plan(PlanInput(**{**base.__dict__, "dtype": "bf16", "device": "cpu"}))
    assert bf16_cpu.activations == 32 * (tokens * (compute_precision * 2 + fp32 * 4) + 400**2 * 2)
    bf16_cuda = plan(PlanInput(**{**base.__dict__, "dtype": "bf16"}))  # LoRA inputs autocast
    lora_part = 4 * 576 + 8 * 4
    bf16_layer = tokens * (compute_precision * 2 + (fp32 - lora_part) * 4 + lora_part * 2)
    assert bf16_cuda.activations == 32 * (bf16_layer + 400**2 * 2)
    mlp = plan(PlanInput(**{**base.__dict__, "targets": ("down_proj",)}))
    # each target's own input width and r-wide middle: four of 576 + 8 against one of 1536 + 8
    assert result.activations - mlp.activations == 32 * tokens * 4 * (4 * (576 + 8) - (1536 + 8))
    ddp = plan(PlanInput(**{**base.__dict__, "engine": "ddp", "gpus": 2}))
    assert ddp.activations == 32 * (tokens // 2 * per_token + 200**2 * 4)  # one pair per GPU


def test_recommendation_takes_the_cheapest_setup_that_fits() -> None:
    eight_b = PlanInput(model_shape("8b"), lora_r=64, targets=ALL_LINEAR, batch=8, seq_len=2048)
    assert not plan(eight_b).fits
    setup, fitting = recommend(eight_b)  # type: ignore[misc]
    assert (setup.engine, setup.gpus, setup.checkpointing, setup.quantize) == (
        "single", 1, True, None)  # fmt: skip
    assert fitting.fits and fitting.total < 0.9 * 80 * GIB
    seventy_b = PlanInput(model_shape("70b"), lora_r=64, targets=ALL_LINEAR, batch=8, seq_len=2048)
    setup, fitting = recommend(seventy_b)  # type: ignore[misc]  # not even NF4 on one GPU
    assert (setup.engine, setup.quantize, setup.checkpointing) == ("fsdp", None, True)
    assert setup.gpus in (2, 4, 8) and fitting.fits
    fewer = replace(setup, gpus=setup.gpus // 2)
    assert setup.gpus == 2 or not plan(fewer).fits  # the fewest GPUs that fit
    small = PlanInput(model_shape("70b"), lora_r=16, batch=1, seq_len=1024)
    setup, fitting = recommend(small)  # type: ignore[misc]
    assert setup.quantize == "nf4" and setup.gpus == 1 and fitting.fits  # QLoRA on one GPU
    small_gpus = PlanInput(model_shape("70b"), batch=64, seq_len=8192, gpu_memory_gib=24)
    assert recommend(small_gpus) is None


def test_refusal_names_each_single_change_that_fits() -> None:
    assert refusal(plan(PlanInput(SMOL))) == ""
    eight_b = model_shape("8b")
    activations = refusal(plan(PlanInput(eight_b, dtype="fp32", batch=8, seq_len=2048)))
    assert activations.startswith("the plan does not fit: ")
    assert "hyper.activation_checkpointing: 1 (" in activations
    assert "training.kubernetes.gpus: 1" in activations  # the recommended setup
    precision = refusal(plan(PlanInput(eight_b, dtype="fp32", batch=1, seq_len=256,
                                       checkpointing=True, gpu_memory_gib=30)))  # fmt: skip
    assert "training.dtype: bf16 (" in precision
    assert "change hyper.activation_checkpointing" not in precision  # it is on already
    batch = refusal(plan(PlanInput(eight_b, batch=64, seq_len=2048, checkpointing=True)))
    assert "hyper.batch_size: 1 with hyper.grad_accum ×64" in batch
    assert "hyper.max_length" not in batch  # halving the length alone does not fit
    seventy_b = refusal(plan(PlanInput(model_shape("70b"), engine="ddp", gpus=8, lora_r=64,
                                       batch=8, seq_len=2048)))  # fmt: skip
    assert "fsdp on 4 GPU(s) (run_spec.engine: fsdp)" in seventy_b
    checkpointed = refusal(plan(PlanInput(model_shape("70b"), engine="ddp", gpus=8, lora_r=64,
                                          batch=8, seq_len=2048, checkpointing=True)))  # fmt: skip
    assert "change run_spec.engine: fsdp (34.1 GiB)" in checkpointed  # same GPUs, sharded
    huge = refusal(plan(PlanInput(model_shape("70b"), batch=64, seq_len=8192, gpu_memory_gib=24)))
    assert "no single change" in huge and "up to 8 GPUs" in huge


def test_alignd_plan_exit_codes(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "smollm2"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "--model", "70b", "--batch", "8", "--seq-len", "2048"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "recommendation: fsdp on" in out
    assert main(["plan", "--model", str(tiny_model_dir), "--cpu", "--dtype", "fp32"]) == 0
    assert "(planned as a CPU run)" in capsys.readouterr().out
    assert main(["plan", "--model", "/nonexistent"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["plan", "--targets", "lm_head"]) == 2
    assert "knows no module 'lm_head'" in capsys.readouterr().err
    assert main(["plan", "--engine", "single", "--gpus", "2"]) == 2
    assert main(["plan", "--engine", "fsdp", "--gpus", "2", "--quantize", "nf4"]) == 2


def test_a_config_without_kv_heads_means_one_per_head(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "vocab_size": 100}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(str(tmp_path))
    assert shape.kv_heads == 4 and shape.kv_width == 64 and not shape.tied


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("targets", [ATTENTION, ALL_LINEAR])
def test_activations_match_what_autograd_keeps(
    tiny_model_dir: Path, dtype: str, targets: tuple[str, ...]
) -> None:
    """The planner's activations per layer against the tensors autograd really saves for
    backward in the trainer's packed-pair forward (tiny Llama, LoRA attached as the trainer
    does, training mode): a transformers, peft or torch change that keeps more per token, or
    keeps the attention probabilities, fails here before it makes a Job run out of memory."""
    import torch

    from trainer.logprobs import Encoded
    from trainer.model import attach_lora, load_base
    from trainer.packing import pack_pairs, pair_logps
    from trainer.spec import LoraSpec

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model, _ = load_base(str(tiny_model_dir), torch.device("cpu"), torch_dtype)
    model = attach_lora(model, LoraSpec(r=8, target_modules=targets))
    model.train()
    pairs, seq_len = 4, 100  # one prompt token and replies that differ from their first token
    chosen = [Encoded((1,), tuple(range(10, 9 + seq_len))) for _ in range(pairs)]
    rejected = [Encoded((1,), tuple(range(200, 199 + seq_len))) for _ in range(pairs)]
    pack = pack_pairs(chosen, rejected, pad_id=0)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        chosen_logps, _ = pair_logps(model, pack)
    assert chosen_logps.requires_grad

    shape = model_shape(str(tiny_model_dir))
    estimate = plan(PlanInput(shape, lora_r=8, targets=targets, batch=pairs, seq_len=seq_len,
                              dtype=dtype, device="cpu"))  # fmt: skip
    kept_by_layers = estimate.activations_full * shape.layers / (shape.layers + 2)
    # measured 0.98 / 0.97 (attention, fp32 / bf16) and 1.06 / 1.09 (all seven projections:
    # LoRA on the MLP keeps about one intermediate- and two hidden-wide tensors more per token)
    assert 0.85 < sum(saved.values()) / kept_by_layers < 1.15
