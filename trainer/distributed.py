"""Data parallelism under ``torchrun`` / ``accelerate launch`` (one process per GPU or CPU).

Each rank takes its slice of every global micro-batch; after backward the LoRA gradients are
summed across ranks. Because each rank's loss is its examples' *sum* divided by the global
micro-batch size, the summed gradient is exactly the gradient of the global mean: the same
per-step loss and update as one process with the same global batch (up to float summation
order). This is what DDP does, without its bucketing: LoRA gradients are small, and the loop
scores through the model's body and head rather than ``model.forward``, which DDP would need.
FSDP (sharding a base that does not fit one GPU) is not implemented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank :: self.size]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` set up (env ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return World(dist.get_rank(), size), device


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
