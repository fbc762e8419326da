"""Sharded evaluation: each rank takes a contiguous slice of the examples; results are gathered in order.

Per-example results (IS log-likelihoods, encoder means) are all-gathered and concatenated in rank order,
so every rank holds exactly the vector one process computes, and reductions over it run in the same
order as in one process. Without a process group everything is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bype.parallel.gather import gather_rows as gather_blocks
from bype.parallel.process_group import all_reduce_sum, comm_device
from bype.parallel.shard import shard_sizes


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def gather_rows(t: torch.Tensor, n_total: int, world: int) -> torch.Tensor:
    """Concatenate every rank's rows (rank r holds shard_range(n_total, r, world)) on every rank."""
    if not _distributed(world):
        return t
    return gather_blocks(t.to(comm_device()), shard_sizes(n_total, world)).to(t.device)


def sum_over_ranks(values: list[float], world: int) -> list[float]:
    """Float64 sums of per-rank partial sums (on the backend's communication device)."""
    t = torch.tensor(values, dtype=torch.float64)
    if _distributed(world):
        t = all_reduce_sum(t.to(comm_device()))
    return t.cpu().tolist()
