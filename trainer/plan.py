"""The memory planner: a refresh's expected peak memory per GPU, before anything is loaded.

Arithmetic on the model's shape (``config.json``, or a preset), the LoRA settings and the run's
batch, sequence length, precision, quantisation and engine. Parts of the estimate:

- **weights**: parameters × bytes per parameter (fp32 4, bf16/fp16 2; NF4 ≈ 0.52 for the
  decoder's linear layers with double-quantised block scales, embeddings/head/norms kept in
  bf16). FSDP holds 1/n of them plus two gathered layers (the one running and the prefetch),
  and the LM head whole on every GPU (``trainer.distributed``: it is frozen and called outside
  the sharded body; a tied input embedding is that same matrix, an untied one is sharded).
- **LoRA + optimizer**: LoRA parameters × 16 bytes (fp32 weight, gradient, AdamW's two moments);
  FSDP shards them too.
- **activations** kept for backward, per GPU: tokens = pairs per GPU × 2 sequences × sequence
  length (an upper bound: the trainer runs a pair's shared prompt once). Per token and layer,
  in the compute precision: the MLP's three intermediate-wide tensors and four hidden-wide ones
  of attention (queries, keys and values repeated to every head, the output); in fp32 whatever
  the base's precision: six hidden-wide tensors (the norms' upcast residual stream); each LoRA
  target's input and r-wide middle in fp32 on CPU (the adapter is fp32), in the compute
  precision on CUDA (the trainer autocasts a half-precision base). Per layer, the packed rows'
  attention mask: scaled-dot-product attention turns the boolean mask into an additive one in
  the compute precision and keeps it (row² per packed row, rows being ``hyper.pack_tokens``
  long); the attention probabilities are not kept. Plus twice one layer's worth for the
  gradients in flight during its backward. These counts are the tensors autograd saves,
  measured on CPU with SmolLM2 and the tests' tiny model in fp32 and bf16
  (``tests/trainer/test_plan.py``); not yet on a GPU. Activation checkpointing keeps one hidden
  state per token and layer and recomputes one layer at a time.
- **logits**: the LM head runs 256 scored tokens at a time (``trainer.logprobs.HEAD_CHUNK``),
  fp32 logits, their exponentials and their gradient.
- **runtime**: the CUDA context and allocator slack (1 GiB), or on CPU the interpreter and
  libraries (0.45 GiB, measured).

A plan *fits* when its total stays within ``headroom`` (90%) of the GPU's memory. The estimate's
error against measured peaks is printed by ``bench/plan_accuracy.py`` and stated in bench/README.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

GIB = 1024**3
HEAD_CHUNK = 256  # trainer.logprobs.HEAD_CHUNK (not imported: the planner must not load torch)
RUNTIME_BYTES = {"cuda": 1.0 * GIB, "cpu": 0.45 * GIB}
# NF4 with double quantisation: 4 bits per weight, an 8-bit scale per block of 64 and an fp32
# scale per 256 blocks (bitsandbytes' defaults)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
Engine = Literal["single", "ddp", "fsdp"]


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer (Llama/Mistral/Qwen layout)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_linear_params(self) -> int:
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder's linear layers (what NF4 quantises)."""
        return self.layers * self.layer_linear_params

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        return embeddings + self.linear_params + norms

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in, out) features of one target module."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        shapes = {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if name not in shapes:
            raise ValueError(f"the planner knows no module {name!r} (known: {', '.join(shapes)})")
        return shapes[name]

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        return self.layers * sum(r * sum(self.module_shape(t)) for t in targets)

    @classmethod
    def from_config(cls, config: dict[str, object]) -> ModelShape:
        def get(key: str, default: object = None) -> int:
            value = config.get(key, default)
            if not isinstance(value, int):
                raise ValueError(f"config.json has no integer {key!r}")
            return value

        heads = get("num_attention_heads")
        return cls(
            layers=get("num_hidden_layers"),
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size"),
            heads=heads,
            kv_heads=get("num_key_value_heads", heads),
            vocab=get("vocab_size"),
            tied=bool(config.get("tie_word_embeddings", False)),
        )


PRESETS = {
    "smollm2-135m": ModelShape(30, 576, 1536, 9, 3, 49152, tied=True),
    "llama-3-8b": ModelShape(32, 4096, 14336, 32, 8, 128256, tied=False),
    "llama-3-70b": ModelShape(80, 8192, 28672, 64, 8, 128256, tied=False),
}
ALIASES = {"135m": "smollm2-135m", "smollm2": "smollm2-135m", "8b": "llama-3-8b",
           "70b": "llama-3-70b"}  # fmt: skip


def model_shape(model: str) -> ModelShape:
    """A preset (``8b``, ``70b``, ``smollm2-135m`` …) or a model directory's ``config.json``."""
    name = ALIASES.get(model.lower(), model.lower())
    if name in PRESETS:
        return PRESETS[name]
    config = Path(model) / "config.json"
    if not config.is_file():
        known = ", ".join([*PRESETS, *ALIASES])
        raise ValueError(f"{model!r} is neither a preset ({known}) nor a model directory")
    return ModelShape.from_config(json.loads(config.read_text()))


@dataclass(frozen=True)
class PlanInput:
    shape: ModelShape
    lora_r: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch: int = 4  # pairs per micro-batch, all GPUs together
    seq_len: int = 512  # prompt + reply tokens per sequence
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    quantize: Literal["nf4"] | None = None
    engine: Engine = "single"
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    checkpointing: bool = False
    device: Literal["cuda", "cpu"] = "cuda"
    pack_tokens: int = 1024  # hyper.pack_tokens: pairs share rows of about this many tokens
    headroom: float = 0.9


@dataclass(frozen=True)
class Plan:
    input: PlanInput
    weights: float  # bytes per GPU
    lora_optimizer: float
    activations: float
    activations_checkpointed: float  # what activations would be with checkpointing on
    activations_full: float  # and with it off
    logits: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.lora_optimizer + self.activations + self.logits + self.runtime

    @property
    def budget(self) -> float:
        return self.input.gpu_memory_gib * GIB * self.input.headroom

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def plan(p: PlanInput) -> Plan:
    s = p.shape
    if p.engine == "single" and p.gpus != 1:
        raise ValueError("engine 'single' runs on one GPU; use ddp or fsdp for more")
    if p.engine == "fsdp" and p.quantize is not None:
        raise ValueError("engine 'fsdp' does not shard a 4-bit base: use nf4 with single or ddp")
    shards = p.gpus if p.engine == "fsdp" else 1
    if p.quantize == "nf4":
        per_param_other = 2.0  # embeddings, head and norms stay bf16
        weights = s.linear_params * NF4_BYTES + (s.params - s.linear_params) * per_param_other
        layer_bytes = s.layer_linear_params * NF4_BYTES
        compute = 2
    else:
        weights = s.params * DTYPE_BYTES[p.dtype]
        layer_bytes = s.layer_linear_params * DTYPE_BYTES[p.dtype]
        compute = DTYPE_BYTES[p.dtype]
    if shards > 1:
        head = s.vocab * s.hidden * DTYPE_BYTES[p.dtype]
        weights = (weights - head) / shards + head + 2 * layer_bytes
    lora = s.lora_params(p.lora_r, p.targets) * 16 / shards

    pairs = math.ceil(p.batch / p.gpus)
    tokens = pairs * 2 * p.seq_len
    targets_in = sum(s.module_shape(t)[0] for t in p.targets)
    # on CUDA the trainer autocasts a half-precision base, so the fp32 adapter's matmuls keep
    # their inputs in the compute precision; on CPU nothing autocasts and they stay fp32
    lora_bytes = compute if p.device == "cuda" else 4
    per_token_layer = (
        compute * (3 * s.intermediate + 4 * s.hidden)
        + 4 * 6 * s.hidden
        + lora_bytes * (targets_in + p.lora_r * len(p.targets))
    )
    per_row = max(1, p.pack_tokens // (2 * p.seq_len))  # pairs packed into one row
    full_rows, rest = divmod(pairs, per_row)
    row_squares = full_rows * (per_row * 2 * p.seq_len) ** 2 + (rest * 2 * p.seq_len) ** 2
    mask_layer = row_squares * compute
    one_layer = tokens * per_token_layer + mask_layer
    backward = 2 * one_layer  # one layer's gradients in flight while its backward runs
    full = s.layers * one_layer + backward
    checkpointed = s.layers * tokens * s.hidden * compute + one_layer + backward
    logits = min(HEAD_CHUNK, tokens) * s.vocab * 4 * 3 + tokens * s.hidden * compute
    return Plan(
        input=p,
        weights=weights,
        lora_optimizer=lora,
        activations=checkpointed if p.checkpointing else full,
        activations_checkpointed=checkpointed,
        activations_full=full,
        logits=logits,
        runtime=RUNTIME_BYTES[p.device],
    )


def recommend(p: PlanInput, max_gpus: int = 8) -> tuple[PlanInput, Plan] | None:
    """The cheapest setup that fits: one GPU as asked, then with checkpointing, then NF4 on one
    GPU, then FSDP on 2, 4, 8 GPUs with checkpointing (the base in its precision: the trainer
    does not shard a 4-bit base). Data parallel is never a recommendation for memory: every GPU
    holds the whole base. None when nothing fits."""
    single = replace(p, engine="single", gpus=1)
    candidates = [
        single,
        replace(single, checkpointing=True),
        replace(single, checkpointing=True, quantize="nf4"),
    ]
    n = 2
    while n <= max_gpus:
        candidates.append(replace(p, engine="fsdp", gpus=n, checkpointing=True, quantize=None))
        n *= 2
    for candidate in candidates:
        result = plan(candidate)
        if result.fits:
            return candidate, result
    return None


def refusal(result: Plan) -> str:
    """Why a plan cannot run and each single change that would make it fit, with the memory it
    would then need, naming the settings ("" when it fits)."""
    if result.fits:
        return ""
    p = result.input
    need = f"{result.total / GIB:.1f} GiB per GPU > {result.budget / GIB:.1f} GiB"
    options: list[tuple[str, PlanInput]] = []
    if not p.checkpointing:
        options.append(("hyper.activation_checkpointing: 1", replace(p, checkpointing=True)))
    if p.dtype == "fp32" and p.quantize is None:
        options.append(("training.dtype: bf16", replace(p, dtype="bf16")))
    if p.engine == "ddp" and p.quantize is None:
        options.append(("run_spec.engine: fsdp", replace(p, engine="fsdp")))
    if p.batch > 1:
        options.append(
            (f"hyper.batch_size: 1 with hyper.grad_accum ×{p.batch}", replace(p, batch=1))
        )
    options.append((f"hyper.max_length: {p.seq_len // 2}", replace(p, seq_len=p.seq_len // 2)))
    fixes = [
        f"{what} ({fitting.total / GIB:.1f} GiB)"
        for what, setup in options
        if (fitting := plan(setup)).fits
    ]
    best = recommend(p)
    if best is not None:
        fixes.append(_setup(*best))
    if fixes:
        return f"the plan does not fit: {need}; change " + "; or ".join(fixes)
    return (
        f"the plan does not fit: {need}, and no single change of checkpointing, precision, "
        f"NF4, engine, batch or length makes it fit on up to 8 GPUs of {p.gpu_memory_gib:g} GiB"
    )


def _setup(setup: PlanInput, fitting: Plan) -> str:
    return (
        f"{setup.engine} on {setup.gpus} GPU(s)"
        f"{' (run_spec.engine: fsdp)' if setup.engine == 'fsdp' else ''}"
        f"{' with lora.quantize: nf4' if setup.quantize else ''}"
        f"{' and hyper.activation_checkpointing: 1' if setup.checkpointing else ''} "
        f"(training.kubernetes.gpus: {setup.gpus}; {fitting.total / GIB:.1f} GiB per GPU)"
    )


def describe(result: Plan) -> str:
    """``alignd plan``'s table."""
    p, s = result.input, result.input.shape

    def gib(value: float) -> str:
        return f"{value / GIB:8.2f} GiB"

    quantized = f", {p.quantize}" if p.quantize else ""
    lines = [
        f"model: {s.params / 1e9:.2f}B parameters, {s.layers} layers, hidden {s.hidden}, "
        f"vocab {s.vocab}; LoRA r={p.lora_r} on {', '.join(p.targets)} "
        f"({s.lora_params(p.lora_r, p.targets) / 1e6:.1f}M parameters)",
        f"run: {p.batch} pairs per step, {p.seq_len} tokens per sequence, {p.dtype}{quantized}, "
        f"{p.engine} on {p.gpus} GPU(s) of {p.gpu_memory_gib:g} GiB"
        f"{' (planned as a CPU run)' if p.device == 'cpu' else ''}",
        "",
        f"  weights                          {gib(result.weights)}",
        f"  LoRA + optimizer state           {gib(result.lora_optimizer)}",
        f"  activations{' (checkpointed)' if p.checkpointing else '               '}      "
        f"{gib(result.activations)}"
        f"   (without checkpointing {result.activations_full / GIB:.2f}, "
        f"with {result.activations_checkpointed / GIB:.2f})",
        f"  logits (chunked LM head)         {gib(result.logits)}",
        f"  runtime                          {gib(result.runtime)}",
        f"  total per GPU                    {gib(result.total)}   "
        f"({'fits' if result.fits else 'does NOT fit'} in {result.budget / GIB:.1f} GiB = "
        f"{p.headroom:.0%} of {p.gpu_memory_gib:g})",
    ]
    best = recommend(p)
    lines.append(
        f"recommendation: {_setup(*best)}" if best else "recommendation: nothing fits on 8 GPUs"
    )
    if not result.fits:
        lines.append(refusal(result))
    return "\n".join(lines)
