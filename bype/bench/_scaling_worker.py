"""One rank of `bype bench scaling`'s counting job: the per-rank FLOPs and operators of one training step,
and this machine's figures for the cost model (matmul rate, per-operator time, memory bandwidth, the gloo
all-reduce of the gradient), measured on every rank at once, as training loads the cores.

  torchrun ... -m bype.bench._scaling_worker OUT.json key=value ...
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from bype.config import load_config
from bype.parallel.process_group import finish
from bype.models.noise import RowNoise
from bype.bench.perf.flops import _OpCounter, step_profile
from bype.train.loop import Trainer


def _best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _op_chain(length: int = 100) -> None:
    """A forward and backward of `length` tiny operators: dispatch cost only."""
    x = torch.ones(8, requires_grad=True)
    y = x
    for _ in range(length):
        y = y * 1.0001
    y.sum().backward()


def _ops_of(fn) -> int:
    with _OpCounter() as counter:
        fn()
    return counter.ops


def machine_figures(allreduce_bytes: int, gather_bytes: int) -> dict:
    a, b = torch.randn(600, 784), torch.randn(784, 600)  # the gated encoder's first layer, prior + batch rows
    gemm = 2 * 600 * 784 * 600 / _best_of(lambda: torch.mm(a, b), 20)
    tau = _best_of(_op_chain, 5) / _ops_of(_op_chain)  # seconds per dispatched operator, autograd included
    src, dst = torch.ones(16 * 2**20), torch.zeros(16 * 2**20)
    mem_bw = 2 * src.numel() * 4 / _best_of(lambda: dst.copy_(src), 5)  # read + write
    out = {"gemm_flops_per_s": gemm, "seconds_per_op": tau, "mem_bytes_per_s": mem_bw}
    if dist.is_initialized() and dist.get_world_size() > 1:
        for key, n in (("allreduce_seconds", allreduce_bytes), ("gather_allreduce_seconds", gather_bytes)):
            t = torch.zeros(max(1, n // 4))
            dist.barrier()
            out[key] = _best_of(lambda: dist.all_reduce(t), 10)
    return out


def main(argv: list[str]) -> int:
    out_path, overrides = argv[0], argv[1:]
    trainer = Trainer(load_config(None, overrides))
    ctx, model = trainer.ctx, trainer.model
    x, _, idx = next(iter(trainer.data.train_loader.epoch(1)))
    x = model.preprocess(x.to(ctx.device), RowNoise(trainer.cfg.seed, 1, 0, ctx.rank, ctx.world_size))
    shard = model.prior.row_shard
    rows = shard.range(model.prior.n_components) if shard is not None else (0, model.prior.n_components)
    prof = step_profile(model, x, idx.to(ctx.device), step=trainer.engine, prior_rows_here=rows[1] - rows[0])
    prof.update(machine_figures(prof["allreduce_bytes"], prof["gather_bytes"]), rank=ctx.rank,
                threads=torch.get_num_threads())
    ranks = [prof]
    if dist.is_initialized() and ctx.world_size > 1:
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, prof)
    if ctx.is_main:
        with open(out_path, "w") as f:
            json.dump(ranks, f, indent=2)
    finish(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
