"""The cost of a run, measured at start-up before it is paid.

`estimate_costs(trainer)` times a training step (forward and backward of the loss on a batch of the
per-rank size) and a pseudocoreset step (samples, decoder, data term and gradients): one call when
it is slow, else the fastest of two calls after a warm-up call. Then it predicts

    epoch  = steps per epoch x training step
    update = coreset.steps x coreset step           (every coreset.every epochs)

and warns when one update costs more than the `every` epochs of training it serves. Nothing of the run's
state changes: the global RNG is forked, the gradients are returned by `torch.autograd.grad` (no `.grad`,
no optimiser step, no DDP hooks) and the coreset gradients are not applied.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from bype.coreset.optimizer import frozen
from bype.device_sync import synchronize as _sync

log = logging.getLogger("bype")
SLOW_CALL_S = 20.0  # a first call this slow is the measurement: compilation (seconds on a GPU) is a small share
TIMED_CALLS = 2  # otherwise calls timed after the warm-up; the fastest counts (the least disturbed by other load)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _format(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _measure(fn, device: torch.device) -> float:
    """Seconds of one call of `fn`: the first call when it is slow (compilation is then a small share and a
    second call would double the start-up cost), else the fastest of TIMED_CALLS calls after it."""
    first = _timed(fn, device)
    if first >= SLOW_CALL_S:
        return first
    return min(_timed(fn, device) for _ in range(TIMED_CALLS))


def train_step_seconds(trainer) -> float:
    """Forward and backward of one per-rank batch (real validation images)."""
    model, device = trainer.model, trainer.ctx.device
    rows = max(1, trainer.cfg.train.batch_size // trainer.ctx.world_size)
    val = trainer.data.val
    x = val.x[torch.arange(rows) % len(val)].to(device).float().div_(255.0)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss, _ = model.loss(model.preprocess(x), None, trainer.beta(1))
        torch.autograd.grad(loss, params, allow_unused=True)

    was = model.training
    model.train()
    try:
        return _measure(step, device)
    finally:
        model.train(was)


def coreset_step_seconds(trainer) -> float:
    """One pseudocoreset step at the current (U, w), without applying it."""
    coreset, device = trainer.coreset, trainer.ctx.device
    with frozen(trainer.model):
        return _measure(coreset.probe_step, device)


def estimate_costs(trainer) -> dict:
    """Measured step times and predicted epoch / update times (seconds); logged, with a warning when an
    update outweighs the epochs it serves."""
    cfg, device = trainer.cfg, trainer.ctx.device
    out = {"steps_per_epoch": len(trainer.data.train_loader)}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if cfg.dist.engine == "deepspeed":  # its module may hold bf16 or ZeRO-3-partitioned weights
            log.info("cost estimate: training step not measured under DeepSpeed (the engine owns the weights)")
        else:
            out["train_step_s"] = train_step_seconds(trainer)
            out["epoch_s"] = out["train_step_s"] * out["steps_per_epoch"]
        if trainer.coreset is not None:
            c = trainer.coreset
            out.update(coreset_step_s=coreset_step_seconds(trainer), coreset_steps=c.steps, coreset_every=c.every)
            out["update_s"] = out["coreset_step_s"] * c.steps
    if trainer.coreset is not None:
        out.update(samples=trainer.coreset.samples, components=trainer.model.prior.n_components)
    log_estimate(out)
    return out


def log_estimate(out: dict) -> bool:
    """Log the predictions of `estimate_costs`; True (and a warning) when an update outweighs its epochs."""
    if "epoch_s" in out:
        log.info("cost estimate: training step %.3g s x %d steps = %s per epoch (validation not included)",
                 out["train_step_s"], out["steps_per_epoch"], _format(out["epoch_s"]))
    if "update_s" not in out:
        return False
    served = out["coreset_every"] * out.get("epoch_s", math.nan)
    share = out["update_s"] / (out["update_s"] + served)
    log.info("cost estimate: coreset step %.3g s x %d steps (S=%d, M=%d) = %s per update every %d epochs "
             "(%.0f%% of training time)", out["coreset_step_s"], out["coreset_steps"], out["samples"],
             out["components"], _format(out["update_s"]), out["coreset_every"], 100 * share)
    if not out["update_s"] > served:  # also when the epoch was not measured (nan)
        return False
    log.warning("cost estimate: one coreset update (%s) outweighs the %d epochs it serves (%s); lower "
                "coreset.steps or coreset.samples, or raise coreset.every", _format(out["update_s"]),
                out["coreset_every"], _format(served))
    return True
