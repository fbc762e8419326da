"""All-gather of row blocks of uneven size, with and without autograd.

`all_gather_rows(local, sizes)` is open_clip's gather-with-grad for blocks that may differ in length
(500 rows over 3 ranks): forward pads each block to the longest and all-gathers; backward all-reduces
the gradient of the whole gathered tensor and keeps this rank's block.

| pass | collective | result on rank r |
|---|---|---|
| forward | all-gather (padded) | the rows of every rank, in rank order |
| backward | all-reduce (sum), then the own slice | sum over ranks of dLoss_rank / d(rows of r) |

Summing over ranks is what makes the encoder's gradient exact under data parallelism: each rank's loss
covers only its own batch rows, every rank's loss reads every gathered row, and DDP / DeepSpeed then
average the parameter gradients over ranks, so rank r's block receives (1/W) sum_r' dL_r'/d rows_r =
d(global mean loss)/d rows_r, as in one process. (A loss computed identically on every rank would come
out W times too large: open_clip #616.) The backward uses all-reduce rather than reduce-scatter because
gloo has no reduce-scatter; the tensors are small (M x 2d floats).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from bype.parallel.process_group import comm_device


def _gather_padded(local: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    width = max(sizes)
    if local.shape[0] != sizes[dist.get_rank(group)]:
        raise ValueError(f"all_gather_rows: this rank holds {local.shape[0]} rows, its share is "
                         f"{sizes[dist.get_rank(group)]} of {sizes}")
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded.contiguous(), group=group)  # contiguous: pytorch#120386
    return torch.cat([b[:n] for b, n in zip(blocks, sizes)])


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        lo = sum(ctx.sizes[:rank])
        return grad[lo: lo + ctx.sizes[rank]], None, None


def all_gather_rows(local: torch.Tensor, sizes: list[int], group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Concatenate every rank's `local` block (rank r holds sizes[r] rows) on every rank, differentiably."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    return _AllGatherRows.apply(local, list(sizes), group)


@torch.no_grad()
def gather_rows(local: torch.Tensor, sizes: Optional[list[int]] = None,
                group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The same without autograd, on every rank in rank order (for rank r's block of shard_range(n, r, W):
    `sizes = shard_sizes(n, W)`); `sizes` None means equal blocks (the batch indices of a step). The blocks
    travel on the backend's device (gloo: CPU, NCCL: CUDA) and the result comes back to `local`'s."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    if sizes is None:
        sizes = [local.shape[0]] * dist.get_world_size(group)
    return _gather_padded(local.to(comm_device()), list(sizes), group).to(local.device)
