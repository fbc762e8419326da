"""Sharded evaluation: each rank takes a contiguous slice of the examples; results are gathered in order.

Per-example results (IS log-likelihoods, encoder means) are all-gathered and concatenated in rank order,
so every rank holds exactly the vector one process computes, and reductions over it run in the same
order as in one process. Without a process group everything is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bype.parallel.shard import shard_range


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def gather_rows(t: torch.Tensor, n_total: int, world: int) -> torch.Tensor:
    """Concatenate every rank's rows (rank r holds shard_range(n_total, r, world)) on every rank."""
    if not _distributed(world):
        return t
    sizes = [shard_range(n_total, r, world) for r in range(world)]
    longest = max(hi - lo for lo, hi in sizes)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    mine[: t.shape[0]] = t.to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes)]).to(t.device)


def sum_over_ranks(values: list[float], world: int, device: torch.device) -> list[float]:
    """Float64 sums of per-rank partial sums (the comm device of the backend)."""
    t = torch.tensor(values, dtype=torch.float64)
    if _distributed(world):
        if dist.get_backend() == "nccl":
            t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()
