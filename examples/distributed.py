"""Data-parallel training with PyTorch's own engines: DDP or FSDP2 (``fully_shard``).

Launched by ``torchrun``: every rank reads its process-group coordinates from the environment
torchrun sets, builds the same model from the same seed, wraps it (DDP, or ``fully_shard`` per
block and at the root) and only then compiles it, the order PyTorch documents. The compiled
backend is unaware of the wrapping:

- DDP: Dynamo's DDPOptimizer (``torch._dynamo.config.optimize_ddp``) splits the graph at gradient
  bucket boundaries and calls the backend once per piece; each piece's weights are still
  parameters among its inputs, so the quartet2 pass finds and rewrites them as usual.
- FSDP2: Dynamo does not trace FSDP's hooks (``skip_fsdp_hooks``), so the hooks all-gather the
  weights before each block's graph runs and the graph's inputs are the unsharded [N, K]
  parameters: NVFP4 groups run along the true K. A sharded DTensor reaching the backend is left
  in high precision by ``backend.compile_graph`` (never quantized shard by shard).

Each rank trains on its slice of the global batch, so a step sees the same tokens as a
single-process step with that batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

MODES = ("none", "ddp", "fsdp2")
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Environment that keeps NVLink multicast off (NCCL, symmetric memory, NVSHMEM), as the lent
# GPU machines require; the launchers of multi-GPU runs add it to their children's environment.
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class World:
    """This process's place in the job; ``World()`` is a single process."""

    mode: str = "none"
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"


SINGLE_PROCESS = World()


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process started without torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def init(mode: str, device_type: str) -> World:
    """Join the torchrun job (NCCL on CUDA, gloo on CPU); ``"none"`` is a single process."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return SINGLE_PROCESS
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"--distributed {mode} needs torchrun's environment ({', '.join(missing)} unset): "
            f"launch with `torchrun --nproc-per-node N -m quartet_demo "
            f"--distributed {mode}`"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(mode, dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def device_of(world: World, device: torch.device) -> torch.device:
    """A rank's own GPU (``cuda:LOCAL_RANK``) when training on CUDA."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def wrap(model: nn.Module, world: World) -> nn.Module:
    """The module to compile: DDP around ``model``, or ``model`` sharded in place by FSDP2.

    FSDP2 shards each entry of ``model.blocks`` (one all-gather per block) and the root (embedding,
    final norm, lm_head).
    """
    if world.mode == "ddp":
        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if world.mode == "fsdp2":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def local_rows(batch: tuple[torch.Tensor, ...], world: World) -> tuple[torch.Tensor, ...]:
    """This rank's equal slice of a global batch (dim 0); all of it for a single process."""
    rows = batch[0].shape[0]
    if rows % world.size:
        raise ValueError(f"batch size {rows} must be a multiple of the world size {world.size}")
    per_rank = rows // world.size
    return tuple(t[world.rank * per_rank : (world.rank + 1) * per_rank] for t in batch)


def mean(value: torch.Tensor, world: World) -> float:
    """The mean of a scalar over ranks (equal slices: the global batch's mean)."""
    value = value.detach().float()
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value.item()


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list for a single process)."""
    if not world.distributed:
        return [obj]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state dicts on CPU, keyed by parameter name.

    The same format for a single process, DDP and FSDP2 (FSDP2's shards are gathered; a
    collective, so every rank calls it), hence a checkpoint resumes under any mode.
    """
    return get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load :func:`full_state`'s dicts (every rank passes the full dicts; FSDP2 keeps its shard)."""
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )
