"""`fit`: the paper's pseudocoreset update on its own (Algorithm 2; docs/CORESET.md).

Adam steps on (U, w) along the Monte Carlo gradients of KL(pi_Uw || pi_X) (bype.coreset.gradients),
scale-aware step sizes, projection onto w >= 0 with sum(w) = N and U inside a domain, held-out diagnostics
and a rollback safeguard, the samples sharded over ranks (bype.coreset.estimate).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bype.coreset.estimate import Estimate, diagnostics, estimate, loglik_pieces, residual, weight_summary
from bype.parallel.process_group import rank_and_world
from bype.coreset.gradients import _check_shapes
from bype.parallel.shard import shard_range
from bype.seeds import derive_seed

log = logging.getLogger("bype")

# --- constraints ----------------------------------------------------------------------------------
def project_weights(w: torch.Tensor, n_data: float) -> bool:
    """In place: w >= 0 (clamp) and sum(w) = N (rescale). If every weight hit 0, reset to N/M and return
    True. Never the additive renormalisation of the reference, which can make weights negative."""
    w.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
    total = float(w.double().sum())
    if total <= 0.0:
        w.fill_(n_data / w.numel())
        return True
    w.mul_(n_data / total)
    return False


def project_pseudodata(U: torch.Tensor, domain: tuple) -> None:
    U.nan_to_num_(nan=domain[0]).clamp_(domain[0], domain[1])


class Adam:
    """Adam on named tensors, updated in place; its moments and step count persist across updates."""

    def __init__(self, shapes: dict, device, dtype=torch.float32, betas=(0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = {k: torch.zeros(s, device=device, dtype=dtype) for k, s in shapes.items()}
        self.v = {k: torch.zeros(s, device=device, dtype=dtype) for k, s in shapes.items()}

    def step(self, params: dict, grads: dict, lrs: dict) -> None:
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for k, p in params.items():
            g = grads[k].to(p.dtype)
            self.m[k].mul_(b1).add_(g, alpha=1 - b1)
            self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(lrs[k] * (self.m[k] / c1) / ((self.v[k] / c2).sqrt() + self.eps))

    def state_dict(self) -> dict:
        return {"t": self.t, "m": {k: v.clone() for k, v in self.m.items()},
                "v": {k: v.clone() for k, v in self.v.items()}}

    def load_state_dict(self, state: dict) -> None:
        for moment in ("m", "v"):
            for k, cur in getattr(self, moment).items():
                got = state[moment].get(k)
                if got is None or got.shape != cur.shape:
                    shape = None if got is None else list(got.shape)
                    raise ValueError(f"coreset state: adam {moment}[{k!r}] has shape {shape}, expected {list(cur.shape)}")
                cur.copy_(got)
        self.t = int(state["t"])


# --- step sizes -----------------------------------------------------------------------------------
SCHEDULES = ("scaled", "reference")
# (step on w, step on U) per schedule. scaled: Adam on log w (a step of lr_w changes a weight by about
# lr_w x 100 %, whatever N/M is) and on U in units of the data's range, both cosine-decayed to 0 over an
# update's steps (measured in docs/CORESET.md); reference: the reference code's lr / (j + 1) on w and U.
DEFAULT_STEPS = {"scaled": (0.05, 0.01), "reference": (0.5, 0.05)}


def step_sizes(schedule: str, lr_w: float, lr_u: float, j: int, steps: int) -> tuple[float, float]:
    """(step on w or log w, step on U) at step j of `steps`."""
    if schedule == "reference":
        return lr_w / (j + 1), lr_u / (j + 1)
    decay = 0.5 * (1.0 + math.cos(math.pi * j / steps))
    return lr_w * decay, lr_u * decay


def _adam_step(adam: Adam, U: torch.Tensor, w: torch.Tensor, est: Estimate, schedule: str, lrs: tuple) -> None:
    if schedule == "reference":
        adam.step({"U": U, "w": w}, {"U": est.grad_U, "w": est.grad_w}, {"U": lrs[1], "w": lrs[0]})
        return
    # d KL / d log w_m = w_m d KL / d w_m; a weight at 0 stays there (log 0 = -inf, exp(-inf) = 0).
    log_w = w.log()
    adam.step({"U": U, "w": log_w}, {"U": est.grad_U, "w": est.grad_w * w}, {"U": lrs[1], "w": lrs[0]})
    w.copy_(log_w.exp())


# --- fit --------------------------------------------------------------------------------------------
@dataclass
class FitOptions:
    """How `fit` runs: `steps` Adam steps of `samples` draws each, step j's draws from a generator seeded by
    (seed, epoch, j); `schedule` "scaled" (default, scale-free) or "reference"; `lr_w`, `lr_u` default per
    schedule (DEFAULT_STEPS), both times `step_scale`; U kept inside `domain` (lo, hi) when given; with
    `safeguard` an update that leaves the held-out objective worse is undone."""

    steps: int
    samples: int
    seed: int = 0
    epoch: int = 0
    schedule: str = "scaled"
    lr_w: Optional[float] = None
    lr_u: Optional[float] = None
    step_scale: float = 1.0
    domain: Optional[tuple] = None
    safeguard: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"coreset.schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.samples < 2:
            raise ValueError(f"coreset.samples: a covariance needs at least 2 samples, got {self.samples}")

    def step_sizes(self, U: torch.Tensor) -> tuple[float, float]:
        """(step on w, step on U) before the schedule's decay; "scaled" measures U's in units of the domain
        (or, without one, of the data's range)."""
        d_lr_w, d_lr_u = DEFAULT_STEPS[self.schedule]
        lr_w = (d_lr_w if self.lr_w is None else self.lr_w) * self.step_scale
        lr_u = (d_lr_u if self.lr_u is None else self.lr_u) * self.step_scale
        if self.schedule == "scaled":
            width = (self.domain[1] - self.domain[0]) if self.domain is not None else float(U.max() - U.min())
            lr_u *= width if math.isfinite(width) and width > 0 else 1.0
        return lr_w, lr_u


def step_seed(seed: int, epoch: int, step) -> int:
    """A 63-bit seed from (seed, epoch, step), the same in every process (unlike Python's str hash);
    `step` an int, or a name such as "held-out"."""
    return derive_seed("bype-coreset", seed, epoch, step)


def fit(loglik: Callable, U: torch.Tensor, w: torch.Tensor, sample_z: Callable, data_term: Callable, *,
        n_data: float, options: FitOptions, adam: Optional[Adam] = None, pieces: Optional[Callable] = None,
        fused: Optional[Callable] = None) -> dict:
    """Fit the pseudocoreset (U [M, D], w [M]) to the data behind `data_term`, in place.

    `loglik(x [n, D], z [S, d]) -> [n, S]` differentiable in x; `sample_z(U, w, S, generator) -> [S, d]`
    draws from pi_Uw; `data_term(z [S, d]) -> [S]` = sum_n loglik(x_n, z); w stays >= 0 with sum n_data.
    Under torch.distributed every rank passes the same arguments and evaluates its share of the samples
    (bype.coreset.estimate); U, w end identical on every rank.

    Before and after the steps the objective ½Var(R) is estimated on held-out draws (a generator of its
    own, the same random numbers before and after); with `options.safeguard` an update that leaves it worse
    is undone (U, w and the Adam moments restored). `adam` carries the moments across calls. `pieces(U, z,
    lo, hi, generator, with_grad)` and `fused(U, w, z, generator) -> (grad_U, grad_w, R~)` replace the
    generic evaluation of loglik and data_term (the VAE's decoder path; `fused` only in one process).
    Returns floats: steps, skipped_steps, weight_resets, rolled_back, heldout_<d>_before/_after for d in
    half_var, ess, logmeanexp, w_rel_change, u_mean_abs_change, w_min, w_max, w_ess, weights_at_zero;
    and the lists `trace`, ½Var(R) at every step, and `step_seconds`, the wall time of every step.
    """
    o = options
    _check_shapes(U, w, o.samples, torch.zeros(o.samples))  # U [M, D], w [M]
    lr_w, lr_u = o.step_sizes(U)
    steps, samples, schedule, domain, epoch = o.steps, o.samples, o.schedule, o.domain, o.epoch
    adam = adam or Adam({"U": U.shape, "w": w.shape}, U.device, U.dtype)
    rank, world = rank_and_world()
    lo, hi = shard_range(samples, rank, world)
    if pieces is None:
        def pieces(U_, z, lo_, hi_, g, with_grad):
            return loglik_pieces(loglik, data_term, U_, z[lo_:hi_], with_grad)

    def generator(step) -> torch.Generator:
        return torch.Generator(device=U.device).manual_seed(step_seed(o.seed, epoch, step))

    def held_out() -> dict:
        g = generator("held-out")
        z = sample_z(U, w, samples, g)
        return diagnostics(residual(pieces(U, z, lo, hi, g, False), w, lo, samples)[0])

    before = held_out()
    saved = (U.clone(), w.clone(), adam.state_dict())
    trace, seconds, skipped, resets = [], [], 0, 0
    for j in range(steps):
        t0 = time.perf_counter()
        g = generator(j)
        z = sample_z(U, w, samples, g)
        if fused is not None and world == 1:
            est = Estimate(*fused(U, w, z, g))
        else:
            est = estimate(pieces(U, z, lo, hi, g, True), U, w, lo, samples)
        trace.append(0.5 * float(est.R.var()))
        if not (torch.isfinite(est.grad_U).all() and torch.isfinite(est.grad_w).all()):
            skipped += 1  # a non-finite gradient would poison U, w and the Adam moments
            continue
        _adam_step(adam, U, w, est, schedule, step_sizes(schedule, lr_w, lr_u, j, steps))
        if domain is not None:
            project_pseudodata(U, domain)
        if project_weights(w, n_data):
            resets += 1
            log.warning("coreset: epoch %d step %d: every weight reached 0; reset to N/M", epoch, j)
        seconds.append(time.perf_counter() - t0)
    after = held_out()
    # Worse, or not a number after the update (a NaN compares false): roll back.
    rolled_back = o.safeguard and not after["half_var"] <= before["half_var"]
    if rolled_back:
        U.copy_(saved[0])
        w.copy_(saved[1])
        adam.load_state_dict(saved[2])
    w0 = saved[1].double()
    out = {"steps": float(steps), "skipped_steps": float(skipped), "weight_resets": float(resets),
           "rolled_back": float(rolled_back),
           **{f"heldout_{k}_before": v for k, v in before.items()},
           **{f"heldout_{k}_after": v for k, v in after.items()},
           "w_rel_change": float((w.double() - w0).abs().sum() / w0.abs().sum()),
           "u_mean_abs_change": float((U - saved[0]).abs().mean()),
           **weight_summary(w), "trace": trace, "step_seconds": seconds}
    return out

