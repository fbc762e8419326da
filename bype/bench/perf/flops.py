"""What one training step costs on this rank, counted rather than timed: FLOPs (FlopCounterMode), the
operators dispatched, the bytes all-reduced and the optimiser's bytes. These are the cost model's inputs
(bype.bench.perf.cost_model) and `bype bench scaling`'s per-rank FLOPs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

# Normalised Adam per fp32 parameter: read p, g, m, v; write p, m, v; the norm reads g and the division
# writes it back: 9 accesses of 4 bytes.
OPTIMIZER_BYTES_PER_PARAM = 9 * 4


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators a region dispatches (each is at least one kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _train_step(model, x, idx, step) -> None:
    loss, _ = step(x, idx, 1.0)
    loss.backward()


def count_step(step, model, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> dict:
    """FLOPs and operators of one forward + backward `step(x, idx, beta)` (the engine's call, or the model).

    Counted on the eager operators, also under `train.compile`: a dispatch mode cannot trace into a compiled
    graph, and the operator count is what the cost model charges per launch of an eager step."""
    model.train()
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as flops:
        _train_step(model, x, idx, step)
    model.zero_grad(set_to_none=True)
    with torch.compiler.set_stance("force_eager"), _OpCounter() as ops:
        _train_step(model, x, idx, step)
    model.zero_grad(set_to_none=True)
    return {"flops": flops.get_total_flops(), "ops": ops.ops}


def encoder_flops_per_row(model, rows: torch.Tensor) -> float:
    """FLOPs of encoding one mixture row forward and backward (parameter gradients): the prior's unit cost."""
    with FlopCounterMode(display=False) as flops:
        mu, logvar = model.encode_flat(rows)
        (mu.sum() + logvar.sum()).backward()
    model.zero_grad(set_to_none=True)
    return flops.get_total_flops() / rows.shape[0]


def step_profile(model, x: torch.Tensor, idx: Optional[torch.Tensor] = None, step=None,
                 prior_rows_here: Optional[int] = None) -> dict:
    """This rank's step split into a batch part (its rows of the batch) and a prior part (the mixture rows it
    encodes: all M, or its share when sharded), plus operators, all-reduced bytes and optimiser bytes."""
    step = step or model
    counted = count_step(step, model, x, idx)
    prior = model.prior
    m = prior.n_components if prior_rows_here is None else prior_rows_here
    per_row = encoder_flops_per_row(model, x[: max(1, min(len(x), 8))]) if m else 0.0
    prior_flops = per_row * m
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"flops": counted["flops"], "flops_batch": counted["flops"] - prior_flops, "flops_prior": prior_flops,
            "encoder_flops_per_row": per_row, "prior_rows": m, "batch_rows": x.shape[0], "ops": counted["ops"],
            "params": n_params, "allreduce_bytes": 4 * n_params,
            "optimizer_bytes": OPTIMIZER_BYTES_PER_PARAM * n_params,
            "gather_bytes": 4 * (prior.n_components * model.latent_dim * (2 if prior.kind == "vampprior" else 1))}


def model_profile(cfg, input_shape: tuple, batch: int, probe_rows: int = 4) -> dict:
    """One-process step profile of a configured model at global batch `batch`, counted on `probe_rows` rows
    and M = `probe_rows` components and scaled: every part is linear in rows (the B x M mixture term is a
    few B*M*d FLOPs, below the count's resolution at these sizes). Random weights and inputs: FLOPs depend
    on shapes only, so no data set is needed (CelebA need not be on the machine)."""
    from bype.config import config_from_dict, to_dict
    from bype.models import build_model

    m = cfg.prior.components if cfg.prior.kind in ("bype", "vampprior") else 0
    probe = config_from_dict(to_dict(cfg), [f"prior.components={probe_rows}"])
    torch.manual_seed(0)
    model = build_model(probe, input_shape)
    d = int(math.prod(input_shape))
    x = torch.rand(probe_rows, d)
    if probe.model.likelihood == "bernoulli":
        x = x.round()
    if m:
        model.prior.init_from_data(torch.rand(probe_rows, d), probe_rows)
    p = step_profile(model, x)
    rows_scale = batch / probe_rows
    out = dict(p, flops_batch=p["flops_batch"] * rows_scale, flops_prior=p["encoder_flops_per_row"] * m,
               prior_rows=m, batch_rows=batch)
    out["flops"] = out["flops_batch"] + out["flops_prior"]
    out["gather_bytes"] = 4 * m * model.latent_dim * (2 if cfg.prior.kind == "vampprior" else 1)
    return out
