"""Process-group set-up and the few collectives the trainer needs.

One code path for a single process, torchrun DDP and DeepSpeed: `init_distributed` reads the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK); without it everything degrades to no-ops.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(cfg) -> DistContext:
    """Join the process group when launched by torchrun (or when dist.engine asks for one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if world > 1 and cfg.dist.engine == "none":
        raise RuntimeError(f"launched with WORLD_SIZE={world} but dist.engine is none; set dist.engine=ddp "
                           "or dist.engine=deepspeed")
    if world > 1 and not dist.is_initialized():
        backend = cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src)
    return t


def finish(exit_code: int = 0) -> None:
    """End a distributed worker cleanly: gloo can abort at interpreter exit otherwise."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
