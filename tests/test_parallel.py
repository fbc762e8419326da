"""bype.parallel: row shards, and the all-gather with autograd behind the sharded prior encodings.

The gradient test runs 3 gloo ranks (mp.spawn, file:// rendezvous) on 500 mixture rows, an uneven
split, and compares the DDP-averaged encoder gradient with the one-process gradient in float64.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bype.parallel import all_gather_rows, gather_rows, shard_range, shard_sizes

M, D, LATENT, BATCH = 500, 6, 3, 12


@pytest.mark.parametrize("n,world", [(500, 3), (500, 2), (2, 3), (0, 2), (7, 1)])
def test_shards_cover_the_rows_once_in_rank_order(n, world):
    sizes = shard_sizes(n, world)
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert [hi - lo for lo, hi in ranges] == sizes
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, rank order = row order


def test_shard_sizes_of_the_issue_example():
    assert shard_sizes(500, 3) == [167, 167, 166]
    with pytest.raises(ValueError, match="rank 3 outside 0..2"):
        shard_range(10, 3, 3)


class MixturePrior(nn.Module):
    """A linear encoder and a mixture over encoded rows U: the shape of the ByPE prior's computation."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = nn.Linear(D, LATENT).double()
        with torch.no_grad():
            self.enc.weight.copy_(torch.randn(LATENT, D, generator=g, dtype=torch.float64))
            self.enc.bias.copy_(torch.randn(LATENT, generator=g, dtype=torch.float64))
        self.register_buffer("U", torch.randn(M, D, generator=g, dtype=torch.float64))

    def forward(self, x, shard=None):
        lo, hi = shard if shard is not None else (0, M)
        mu = self.enc(self.U[lo:hi])
        if shard is not None:
            mu = all_gather_rows(mu, shard_sizes(M, dist.get_world_size()))
        z = self.enc(x)
        log_p = torch.logsumexp(-0.5 * torch.cdist(z, mu).square(), 1)
        return -(log_p.mean() + z.square().mean())  # a batch part and a prior part, like the ELBO


def _batch():
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = MixturePrior()
    ddp = nn.parallel.DistributedDataParallel(model)
    x = _batch()[rank::world]  # this rank's rows of the global batch
    loss = ddp(x, shard_range(M, rank, world))
    loss.backward()
    gathered = gather_rows(torch.arange(3) + 10 * rank)  # equal blocks without autograd
    torch.save({"grad": model.enc.weight.grad, "bias": model.enc.bias.grad, "loss": loss.detach(),
                "gathered": gathered}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_gathered_encodings_give_the_one_process_gradient(tmp_path):
    world = 3  # 500 rows over 3 ranks: blocks of 167, 167, 166
    mp.spawn(_worker, args=(world, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=world, join=True)
    model = MixturePrior()
    loss = model(_batch())
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks:  # float64 throughout: only summation order differs, ~1e-15 relative
        assert torch.allclose(r["grad"], model.enc.weight.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(r["bias"], model.enc.bias.grad, rtol=1e-10, atol=1e-12)
        assert torch.equal(r["gathered"], torch.tensor([0, 1, 2, 10, 11, 12, 20, 21, 22]))
    # The local losses average to the global one (equal local batches).
    assert torch.allclose(sum(r["loss"] for r in ranks) / world, loss.detach(), rtol=1e-12)
    # The prior part matters: without it the gradient would differ.
    assert (model.enc.weight.grad - torch.autograd.grad(-model.enc(_batch()).square().mean(),
                                                        model.enc.weight)[0]).abs().max() > 1e-3
