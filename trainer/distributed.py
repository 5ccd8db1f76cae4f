"""Multi-process training under ``torchrun`` (one process per GPU, or per CPU with gloo).

Two engines, one rule: each rank takes its slice of every global micro-batch, and each rank's
loss is its examples' *sum* divided by the global micro-batch size, so the LoRA gradients
*summed* across ranks are exactly the gradient of the global mean: the same per-step loss and
update as one process with the same global batch (up to float summation order).

- ``ddp``: every rank holds the whole base; after backward the LoRA gradients are all-reduced
  (what DDP does, without its bucketing: LoRA gradients are small, and the loop scores through
  the model's body and head rather than ``model.forward``, which DDP would need).
- ``fsdp``: PyTorch's FSDP2 (``fully_shard``) shards every decoder layer and the body's own
  weights (final norm, untied embeddings) across the ranks, LoRA weights included; a layer is
  all-gathered just before its forward and freed after it. Only rank 0 reads the base; the
  others build it on the ``meta`` device and receive their shards (:func:`shard_model`).
  Gradients are reduce-scattered by FSDP itself, which averages them; the backward is scaled
  by the number of ranks so the result is the sum (gloo has no pre-multiplied sum to ask FSDP
  for it). AdamW steps on each rank's shard. The LM head (and the input embedding when tied
  to it) stays whole on every rank: it is frozen, so it needs no gradient traffic, and the
  loop calls it outside the body. Every forward is a collective, so every rank runs every
  scoring pass (reference, evaluation, generation) on the same inputs; only rank 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

Engine = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    engine: Engine = "ddp"

    @property
    def sharded(self) -> bool:
        """FSDP over more than one rank: forwards are collectives, gradients are FSDP's."""
        return self.engine == "fsdp" and self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank :: self.size]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @property
    def backward_scale(self) -> float:
        """FSDP averages the gradients over the ranks; the loop needs their sum."""
        return float(self.size) if self.sharded else 1.0

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """DDP: all-reduce the LoRA gradients. FSDP has already reduce-scattered them."""
        if self.size == 1 or self.sharded:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def all_true(self, flags: list[bool]) -> list[bool]:
        """Element-wise AND of ``flags`` across the ranks (a collective)."""
        if self.size == 1:
            return flags
        mask = torch.tensor(flags, dtype=torch.int32)
        dist.all_reduce(mask, op=dist.ReduceOp.MIN)
        return [bool(v) for v in mask.tolist()]


def init_world(device: torch.device, engine: Engine = "ddp") -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` set up (env ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(engine=engine), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # NCCL for the model's tensors; gloo for the step statistics, which live on the CPU
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), size, engine), device


def load_base_for(
    world: World, name: str, device: torch.device, dtype: torch.dtype, quantize: str | None
) -> tuple[Any, Any]:
    """The base and its tokenizer as this process needs them before :func:`shard_model`:
    unsharded, on ``device``; FSDP process 0, in host memory (each layer moves to its GPU as it
    is sharded); the other FSDP processes, a weightless skeleton filled from process 0."""
    from trainer.model import load_base, load_skeleton

    if not world.sharded:
        return load_base(name, device, dtype, quantize)
    if world.is_main:
        return load_base(name, torch.device("cpu"), dtype, quantize)
    return load_skeleton(name, dtype)


def shard_model(model: Any, world: World, device: torch.device) -> None:
    """FSDP2: one unit per decoder layer, then the body; the (frozen) head stays whole.

    Only process 0 holds the base's weights (read into host memory); the others hold a
    ``meta`` skeleton (``trainer.model.load_skeleton``) with the same LoRA wrapping. After
    sharding, process 0's full state (base and initial LoRA weights) is sent out: each process
    receives its shards and the whole head, so host memory holds one copy of the base per node,
    not one per process. Buffers outside any state dict (rotary frequencies) come from process
    0 too.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trainer.logprobs import body_and_head

    full_state = model.state_dict() if world.is_main else {}  # before sharding: whole tensors
    body, head = body_and_head(model)
    mesh = init_device_mesh(device.type, (world.size,))
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"fsdp: {type(body).__name__} has no .layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)  # moves the layer to the device, then keeps its shard
    # The head's weight (the embedding's too, when tied) is left out: frozen, called directly.
    fully_shard(body, mesh=mesh, ignored_params=set(head.parameters()))
    if world.is_main:
        head.to(device)
    else:
        model.to_empty(device=device)  # room for the shards and the head, filled just below
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    del full_state
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def held_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the model): equal unless sharded."""
    held = total = 0
    for p in model.parameters():
        local = getattr(p, "to_local", None)
        held += (local() if local is not None else p).numel()
        total += p.numel()
    return held, total


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole on every rank; a plain tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def close_world(wait_for_peers: bool = False) -> None:
    """Leave the process group. ``wait_for_peers``: every rank did the same work and reached the
    end, so wait for the others first — a rank that tears down its gloo connections while a peer
    still talks to it aborts ("terminate called without an active exception", seen at the drift
    probe's exit). Not after a failure (the peer may never arrive; torchrun stops it), and not
    in training, where DDP's other ranks leave while rank 0 evaluates for minutes (longer than a
    collective's timeout on a large base)."""
    if dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
