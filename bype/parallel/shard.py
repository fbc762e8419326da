"""Which of n rows a rank owns: one contiguous block per rank, the first n % W ranks one row longer.

One rule for every sharded set (the prior's mixture rows, Monte Carlo samples, evaluation slices), so
that rank r always owns rows shard_range(n, r, W) and rank order is row order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


def shard_sizes(n: int, world: int) -> list[int]:
    """Rows per rank, e.g. 500 over 3 ranks -> [167, 167, 166]."""
    if n < 0 or world < 1:
        raise ValueError(f"shard_sizes: need n >= 0 and world >= 1, got n={n}, world={world}")
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of the rows rank `rank` of `world` owns."""
    if not 0 <= rank < world:
        raise ValueError(f"shard_range: rank {rank} outside 0..{world - 1}")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


@dataclass(frozen=True)
class RowShard:
    """This rank's place among the ranks that share a mixture's rows (None group: the default group)."""

    rank: int
    world_size: int
    group: Optional[dist.ProcessGroup] = None

    def range(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.rank, self.world_size)

    def sizes(self, n: int) -> list[int]:
        return shard_sizes(n, self.world_size)


def attach_row_shard(model, ctx, enabled: bool = True) -> Optional[RowShard]:
    """Let the model's prior encode only this rank's share of its mixture rows (several ranks, `enabled`).

    Set by the DDP and DeepSpeed engines; a single process keeps the prior's unsharded path.
    """
    prior = getattr(model, "prior", None)
    shard = RowShard(ctx.rank, ctx.world_size) if enabled and ctx.world_size > 1 else None
    if prior is not None:
        prior.row_shard = shard
    return shard
