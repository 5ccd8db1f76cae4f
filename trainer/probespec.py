"""The drift probe's contract: what the daemon asks (``probe.json``) and what the probe answers
(``out.json``), read and written through these models on both sides (``trainer.probe``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from feedback.base import FrozenModel


class ProbeSpec(FrozenModel):
    base_model: str = Field(description="the served base, as training names it")
    adapter: Path = Field(description="the served adapter's directory")
    retain_set: str = Field("default", description="eval.retain_set: 'default' or a JSONL path")
    max_new_tokens: int = Field(48, gt=0, description="the reference replies' length cap")
    cache_dir: Path | None = Field(None, description="where the reference replies are cached")
    dtype: str = Field("auto", description="the precision training uses")
    quantize: str | None = Field(None, description="lora.quantize, as in training")
    engine: Literal["ddp", "fsdp"] = Field("ddp", description="fsdp: shard the base as training")


class ProbeResult(FrozenModel):
    nats_per_reply: float = Field(description="KL(reference ‖ adapter) summed per reply, mean")
    ci95: float
    nats_per_token: float
    num_replies: int
    processes: int = 1
    parameters_held: int = 0
    parameters: int = 0
