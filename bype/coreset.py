"""The pseudocoreset optimiser (the paper's Algorithm 2; maths in docs/CORESET.md).

With f(x, z) = log p(x|z), pi_X ∝ exp(sum_n f(x_n, z)) p0(z) and pi_Uw ∝ exp(sum_m w_m f(u_m, z)) p0(z),
the pseudodata U and weights w minimise KL(pi_Uw || pi_X), whose gradients are covariances under pi_Uw
with the residual R(z) = sum_n f(x_n, z) - sum_m w_m f(u_m, z):

    grad_w   = -Cov[f(U, z), R(z)]            grad_u_m = -w_m Cov[grad_u f(u_m, z), R(z)]

`kl_gradients` is the Monte Carlo estimate for any differentiable log-likelihood; `fit` is the optimiser on
its own (scale-aware Adam steps, projection onto w >= 0, sum(w) = N, U in a domain, held-out diagnostics
and a rollback safeguard, samples sharded over ranks); `PseudocoresetOptimizer` calls it inside training:
z from the mixture prior, the data term exact from sufficient statistics where the likelihood has them,
closed-form (or fused-kernel) gradients.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Optional

import torch
from torch import nn

import kernels
from bype.coreset_data import build_data_term, resolve_mode
from bype.coreset_exemplar import DEFAULT_DRAWS, DEFAULT_LR, all_means, fit_exemplar
from bype.coreset_estimate import (Estimate, Pieces, diagnostics, estimate, loglik_pieces, process_group,
                                   residual, weight_summary)
from bype.parallel.process_group import all_reduce_sum
from bype.parallel.shard import shard_range
from bype.seeds import derive_seed
from bype.models.vae import reparameterize

log = logging.getLogger("bype")

STATE_VERSION = 1
KERNEL_LIKELIHOODS = ("bernoulli", "logistic")  # the ones kernels.coreset_grads fuses
GRAD_PATHS = ("auto", "kernel", "closed_form", "autograd")
OBJECTIVES = ("posterior", "exemplar")  # the paper's KL(pi_Uw || pi_X); the Exemplar prior's cross-entropy
AUTOGRAD_CHUNK = 2**24  # elements of one [rows, S, D] autograd chunk in the generic path


# --- gradients ------------------------------------------------------------------------------------
def _check_shapes(U: torch.Tensor, w: torch.Tensor, n_samples: int, data_term: torch.Tensor) -> None:
    if U.dim() != 2:
        raise ValueError(f"U: expected [M, D], got shape {list(U.shape)}")
    if w.shape != (U.shape[0],):
        raise ValueError(f"w: expected [M]=[{U.shape[0]}], got shape {list(w.shape)}")
    if data_term.shape != (n_samples,):
        raise ValueError(f"data_term: expected [S]=[{n_samples}], got shape {list(data_term.shape)}")
    if n_samples < 2:
        raise ValueError(f"z: a covariance needs at least 2 samples, got S={n_samples}")


def residual_and_grad_w(A: torch.Tensor, w: torch.Tensor, data_term: torch.Tensor):
    """A [M, S] = f(u_m, z_s) -> (grad_w [M], centred residual R~ [S] in float64).

    Works in float64: the data term and w @ A are both O(N D) in size and nearly cancel.
    """
    A = A.detach().double()
    R = data_term.detach().double() - w.detach().double() @ A
    R_c = R - R.mean()
    A_c = A - A.mean(1, keepdim=True)
    grad_w = -(A_c @ R_c) / (A.shape[1] - 1)
    return grad_w.to(w.dtype), R_c


def _autograd_grad_u(loglik_u: Callable[[torch.Tensor], torch.Tensor], U: torch.Tensor, w: torch.Tensor,
                     R_c: torch.Tensor, rows: int) -> torch.Tensor:
    """d/dU sum_{m,s} w_m f(u_m, z_s) R~_s, `rows` pseudodata at a time (bounds the autograd graph)."""
    out = torch.empty_like(U)
    coef, w = R_c.to(U.dtype), w.detach()
    for start in range(0, U.shape[0], rows):
        u = U[start:start + rows].detach().requires_grad_(True)
        with torch.enable_grad():
            a = loglik_u(u)
            (g,) = torch.autograd.grad((a * w[start:start + rows, None] * coef).sum(), u, allow_unused=True)
        out[start:start + rows] = 0 if g is None else g
    return out


def kl_gradients(loglik: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], U: torch.Tensor, w: torch.Tensor,
                 z: torch.Tensor, data_term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo gradients of KL(pi_Uw || pi_X) w.r.t. U [M, D] and w [M] (eq. 18-19).

    `loglik(x [n, D], z [S, d]) -> [n, S]` (differentiable in x), `z` samples from pi_Uw,
    `data_term [S]` = sum_n f(x_n, z_s). Covariances centred over the samples, unbiased (1/(S-1)).
    """
    n_samples = z.shape[0]
    _check_shapes(U, w, n_samples, data_term)
    u = U.detach().requires_grad_(True)
    with torch.enable_grad():
        A = loglik(u, z)
        if A.shape != (U.shape[0], n_samples):
            raise ValueError(f"loglik(U, z): expected [M, S]=[{U.shape[0]}, {n_samples}], got {list(A.shape)}")
        grad_w, R_c = residual_and_grad_w(A, w, data_term)
        # One autograd call on sum_{m,s} w_m A[m,s] R~_s gives w_m sum_s grad_u f(u_m, z_s) R~_s for every m.
        (g,) = torch.autograd.grad((A * w.detach()[:, None] * R_c.to(A.dtype)).sum(), u, allow_unused=True)
    grad_U = torch.zeros_like(U) if g is None else -g / (n_samples - 1)
    return grad_U, grad_w


def likelihood_gradients(likelihood, U: torch.Tensor, w: torch.Tensor, params: torch.Tensor,
                         data_term: torch.Tensor, path: str = "auto"):
    """KL gradients for decoder outputs `params` [S, P, D] of a `bype` likelihood.

    path: "kernel" (kernels.coreset_grads), "closed_form" (likelihood.grad_u_contract), "autograd", or
    "auto" (the first available in that order). Returns (grad_U, grad_w, R~ float64 [S]).
    """
    n_samples = params.shape[0]
    _check_shapes(U, w, n_samples, data_term)
    if path == "auto":
        path = gradient_path(likelihood)
    if path == "kernel":
        grad_U, grad_w, R_c = kernels.coreset_grads(U, w, params, data_term, likelihood.name)
        return grad_U, grad_w, R_c.double()
    A = likelihood.pairwise_log_prob(U, params)
    grad_w, R_c = residual_and_grad_w(A, w, data_term)
    contracted = likelihood.grad_u_contract(U, params, R_c.to(U.dtype)) if path == "closed_form" else None
    if contracted is not None:
        g = w[:, None] * contracted
    elif path in ("closed_form", "autograd"):
        rows = max(1, AUTOGRAD_CHUNK // (n_samples * U.shape[1]))
        g = _autograd_grad_u(lambda u: likelihood.pairwise_log_prob(u, params), U, w, R_c, rows)
    else:
        raise ValueError(f"path: {path!r} is not one of {', '.join(GRAD_PATHS)}")
    return -g / (n_samples - 1), grad_w, R_c


def gradient_path(likelihood) -> str:
    """kernel where kernels.coreset_grads exists for this likelihood, else closed form where the likelihood
    has grad_u_contract, else autograd."""
    if likelihood.name in KERNEL_LIKELIHOODS and hasattr(kernels, "coreset_grads"):
        return "kernel"
    probe = likelihood.grad_u_contract(torch.zeros(1, 1), torch.zeros(2, likelihood.planes, 1), torch.zeros(2))
    return "closed_form" if probe is not None else "autograd"


def kl_estimate(residual: torch.Tensor) -> float:
    """The log-mean-exp estimate of KL(pi_Uw || pi_X) from samples of pi_Uw: pi_X ∝ e^R pi_Uw, so
    KL = log E[e^R] - E[R] exactly; estimated with the same samples (invariant to a constant shift of R).
    Biased low and capped near max R - mean R - log S (coreset_estimate.diagnostics, `logmeanexp`)."""
    R = residual.double()
    return float(torch.logsumexp(R, 0) - math.log(R.shape[0]) - R.mean())


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
STEP_SHRINK, STEP_GROW = 0.1, 2.0  # the optimiser's trust factor after a rolled-back / an accepted update


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
def fit(loglik: Callable, U: torch.Tensor, w: torch.Tensor, sample_z: Callable, data_term: Callable, *,
        n_data: float, steps: int, samples: int, seed: int = 0, schedule: str = "scaled",
        lr_w: Optional[float] = None, lr_u: Optional[float] = None, domain: Optional[tuple] = None,
        adam: Optional[Adam] = None, epoch: int = 0, safeguard: bool = True, step_scale: float = 1.0,
        pieces: Optional[Callable] = None, fused: Optional[Callable] = None) -> dict:
    """Fit the pseudocoreset (U [M, D], w [M]) to the data behind `data_term`, in place.

    `loglik(x [n, D], z [S, d]) -> [n, S]` differentiable in x; `sample_z(U, w, S, generator) -> [S, d]`
    draws from pi_Uw; `data_term(z [S, d]) -> [S]` = sum_n loglik(x_n, z). `steps` Adam steps of `samples`
    draws each, step j's draws from a generator seeded by (seed, epoch, j); w stays >= 0 with sum n_data,
    U inside `domain` (lo, hi) when given. `schedule`: "scaled" (default, scale-free) or "reference";
    `lr_w`, `lr_u` default per schedule (DEFAULT_STEPS), both times `step_scale`. Under torch.distributed
    every rank passes the same arguments and evaluates its share of the samples (coreset_estimate); U, w
    end identical on every rank.

    Before and after the steps the objective ½Var(R) is estimated on held-out draws (a generator of its
    own, the same random numbers before and after); with `safeguard` an update that leaves it worse is
    undone (U, w and the Adam moments restored). `adam` carries the moments across calls. `pieces(U, z,
    lo, hi, generator, with_grad)` and `fused(U, w, z, generator) -> (grad_U, grad_w, R~)` replace the
    generic evaluation of loglik and data_term (the VAE's decoder path; `fused` only in one process).
    Returns floats: steps, skipped_steps, weight_resets, rolled_back, heldout_<d>_before/_after for d in
    half_var, ess, logmeanexp, w_rel_change, u_mean_abs_change, w_min, w_max, w_ess, weights_at_zero;
    and the lists `trace`, ½Var(R) at every step, and `step_seconds`, the wall time of every step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"coreset.schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if samples < 2:
        raise ValueError(f"coreset.samples: a covariance needs at least 2 samples, got {samples}")
    _check_shapes(U, w, samples, torch.zeros(samples))  # U [M, D], w [M]
    d_lr_w, d_lr_u = DEFAULT_STEPS[schedule]
    lr_w = (d_lr_w if lr_w is None else lr_w) * step_scale
    lr_u = (d_lr_u if lr_u is None else lr_u) * step_scale
    if schedule == "scaled":  # U's steps in units of the domain (or, without one, of the data's range)
        width = (domain[1] - domain[0]) if domain is not None else float(U.max() - U.min())
        lr_u *= width if math.isfinite(width) and width > 0 else 1.0
    adam = adam or Adam({"U": U.shape, "w": w.shape}, U.device, U.dtype)
    rank, world = process_group()
    lo, hi = shard_range(samples, rank, world)
    if pieces is None:
        def pieces(U_, z, lo_, hi_, g, with_grad):
            return loglik_pieces(loglik, data_term, U_, z[lo_:hi_], with_grad)

    def generator(step) -> torch.Generator:
        return torch.Generator(device=U.device).manual_seed(step_seed(seed, epoch, step))

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
    rolled_back = safeguard and not after["half_var"] <= before["half_var"]
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


# --- the optimiser inside training --------------------------------------------------------------------
def step_seed(seed: int, epoch: int, step) -> int:
    """A 63-bit seed from (seed, epoch, step), the same in every process (unlike Python's str hash);
    `step` an int, or a name such as "held-out"."""
    return derive_seed("bype-coreset", seed, epoch, step)


@contextlib.contextmanager
def frozen(model: nn.Module):
    """The VAE in eval mode without autograd; its training mode is restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


class PseudocoresetOptimizer:
    """Algorithm 2: every `every` epochs, `fit` runs `steps` Adam steps on (U, w) of the model's ByPE prior
    with the VAE frozen; z from the mixture prior, the data term exact from sufficient statistics where
    the likelihood has them, gradients from the fused kernel or the closed form in one process, the
    samples sharded over ranks under DDP / DeepSpeed."""

    def __init__(self, model: nn.Module, data, *, every: int = 10, steps: Optional[int] = None,
                 samples: Optional[int] = None, batch_size: int = 100, lr: Optional[float] = None,
                 lr_u: Optional[float] = None, schedule: str = "scaled", safeguard: bool = True,
                 data_term: str = "auto", seed: int = 0, ctx=None, grad_path: str = "auto",
                 objective: str = "posterior"):
        prior = model.prior
        if getattr(prior, "kind", None) != "bype":
            raise ValueError(f"prior.kind: the pseudocoreset optimiser needs the bype prior, got {prior.kind!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"coreset.schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"coreset.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.objective = objective
        self.model, self.prior, self.likelihood = model, prior, model.likelihood
        self.data = data
        # sum_n x_n of the training grey levels: the weighted-mean gap ||sum x - sum w u|| / N is logged
        # before and after every update (the only thing the paper's objective sees for linear likelihoods).
        self.sum_x = torch.as_tensor(data.stats["sum_x"], dtype=torch.float64).reshape(-1).to(prior.U.device)
        self.n_data = int(data.n_train)
        self.every, self.seed, self.schedule, self.safeguard = every, seed, schedule, safeguard
        self._lr_given, self._lr_u_given = lr, lr_u
        self.lr = DEFAULT_STEPS[schedule][0] if lr is None else lr
        self.lr_u = DEFAULT_STEPS[schedule][1] if lr_u is None else lr_u
        self.steps = steps or max(1, self.n_data // batch_size)
        default_samples = DEFAULT_DRAWS if objective == "exemplar" else prior.n_components
        self.samples = samples or default_samples
        if self.samples < 2:
            raise ValueError(f"coreset.samples: needs at least 2 samples for a covariance, got {self.samples}")
        self.device = prior.U.device
        self.mode = resolve_mode(data_term, self.likelihood, model.data_dim)
        # The samples, not the data rows, are what ranks share: each rank's data term covers all rows.
        self.data_term = build_data_term(self.mode, self.likelihood, data, model.data_dim, batch_size, self.device)
        if grad_path not in GRAD_PATHS:
            raise ValueError(f"grad_path: {grad_path!r} is not one of {', '.join(GRAD_PATHS)}")
        self.grad_path = gradient_path(self.likelihood) if grad_path == "auto" else grad_path
        self.adam = Adam({"U": prior.U.shape, "w": prior.w.shape}, self.device, prior.U.dtype)
        self.updates = 0
        self.total_steps = 0
        self.rollbacks = 0
        # Trust factor on both step sizes: a rolled-back update shrinks it, an accepted one grows it back
        # towards 1, so the steps settle where the likelihood's own scale wants them (a discretised
        # logistic needs U steps ~100x smaller than a Bernoulli: docs/CORESET.md).
        self.step_scale = 1.0
        self.history: list[dict] = []  # one summary per update
        self.trace: list[float] = []  # ½Var(R) at every step of the latest update
        self.step_seconds: list[float] = []
        if objective == "exemplar":
            log.info("coreset: exemplar objective (cross-entropy to the Exemplar prior), M=%d, %d draws, %d steps "
                     "every %d epochs, Adam %g on U's and w's logits", prior.n_components, self.samples,
                     self.steps, every, self.exemplar_lrs()[0])
        else:
            log.info("coreset: %s data term, %s gradients, M=%d, S=%d, %d steps every %d epochs, %s steps "
                     "(w %g, U %g)", self.mode, self.grad_path, prior.n_components, self.samples, self.steps,
                     every, schedule, self.lr, self.lr_u)

    @classmethod
    def from_config(cls, cfg, model: nn.Module, data, ctx) -> "PseudocoresetOptimizer":
        c = cfg.coreset
        return cls(model, data, every=c.every, steps=c.steps, samples=c.samples, batch_size=c.batch_size,
                   lr=c.lr, lr_u=c.lr_u, schedule=c.schedule, safeguard=c.safeguard, data_term=c.data_term,
                   seed=cfg.seed, ctx=ctx, objective=c.objective)

    def exemplar_lrs(self) -> tuple[float, float]:
        """(step on U's logits, step on w's logits) of the exemplar objective: coreset.lr_u / coreset.lr when
        set, else DEFAULT_LR, times the trust factor."""
        lr_u = DEFAULT_LR if self._lr_u_given is None else self._lr_u_given
        lr_w = DEFAULT_LR if self._lr_given is None else self._lr_given
        return lr_u * self.step_scale, lr_w * self.step_scale

    def mean_gap(self) -> float:
        """||sum_n x_n - sum_m w_m u_m|| / N: zero whenever the coreset's weighted mean matches the data's."""
        w, U = self.prior.w.double(), self.prior.U.double()
        return float(torch.linalg.vector_norm(self.sum_x - w @ U) / self.n_data)

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0

    # --- what `fit` evaluates -----------------------------------------------------------------------
    def sample_z(self, U: torch.Tensor, w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """Algorithm 1, steps 1-2: m ~ Cat(w / N), z ~ N(mu(u_m), s2 I)."""
        pick = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
        mu = self.component_means(U)[pick]
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * self.prior.log_var)

    def component_means(self, U: torch.Tensor) -> torch.Tensor:
        """mu(u_m) [M, d]; under torch.distributed each rank encodes its share of the rows and an all-reduce
        of the zero-padded [M, d] gathers them (exact: every slot is one value plus zeros)."""
        rank, world = process_group()
        if world == 1:
            return self.model.encode_flat(U)[0]
        lo, hi = shard_range(U.shape[0], rank, world)
        mine = self.model.encode_flat(U[lo:hi])[0]
        out = torch.zeros(U.shape[0], mine.shape[1], device=mine.device, dtype=mine.dtype)
        out[lo:hi] = mine
        return all_reduce_sum(out)

    def decode(self, z: torch.Tensor, lo: int, hi: int, generator: torch.Generator) -> torch.Tensor:
        """Decoder outputs [hi - lo, P, D] of samples z[lo:hi]. A two-level model's z1 noise is drawn for
        all S samples, so every shard sees the random numbers of one process."""
        if hasattr(self.model, "p_z1"):
            z1 = reparameterize(*self.model.p_z1(z), generator)
            return self.model.decode_x(z1[lo:hi], z[lo:hi])
        return self.model.decode_params(z[lo:hi], generator)

    def pieces(self, U, z, lo, hi, generator, with_grad) -> Pieces:
        params = self.decode(z, lo, hi, generator)
        data = self.data_term(params, generator).double()
        A = self.likelihood.pairwise_log_prob(U, params).double()

        def contract(coef: torch.Tensor) -> torch.Tensor:
            closed = self.likelihood.grad_u_contract(U, params, coef)
            if closed is not None:
                return closed
            rows = max(1, AUTOGRAD_CHUNK // (params.shape[0] * U.shape[1]))
            ones = torch.ones(U.shape[0], device=U.device, dtype=U.dtype)
            return _autograd_grad_u(lambda u: self.likelihood.pairwise_log_prob(u, params), U, ones, coef, rows)

        return Pieces(A, data, contract if with_grad else None)

    def fused(self, U, w, z, generator):
        params = self.decode(z, 0, z.shape[0], generator)
        return likelihood_gradients(self.likelihood, U, w, params, self.data_term(params, generator), self.grad_path)

    def probe_step(self) -> None:
        """One step's work at the current (U, w): draws, decoder, data term, gradients, not applied (what
        the start-up cost estimate times). Collective under torch.distributed, like a step of `fit`."""
        U, w = self.prior.U, self.prior.w
        g = torch.Generator(device=U.device).manual_seed(step_seed(self.seed, 0, "probe"))
        z = self.sample_z(U, w, self.samples, g)
        if self.objective == "exemplar":  # a step's work: the mixture and the encoder on U, both ways
            with torch.enable_grad():
                u = U.detach().requires_grad_(True)
                log_p = kernels.mixture_logpdf(z, self.model.encode_flat(u)[0], torch.log(w / self.n_data),
                                               self.prior.log_var.detach())
                torch.autograd.grad(-log_p.sum(), u)
            return
        rank, world = process_group()
        if world == 1:
            self.fused(U, w, z, g)
        else:
            lo, hi = shard_range(self.samples, rank, world)
            estimate(self.pieces(U, z, lo, hi, g, True), U, w, lo, self.samples)

    def update(self, epoch: int) -> dict:
        """One pseudocoreset update (the VAE frozen); returns floats logged as coreset_<key>."""
        t0 = time.perf_counter()
        gap_before = self.mean_gap()
        with frozen(self.model):
            out = self._fit_exemplar(epoch) if self.objective == "exemplar" else self._fit_posterior(epoch)
        out["mean_gap_before"], out["mean_gap_after"] = gap_before, self.mean_gap()
        self.trace = out.pop("trace")
        self.step_seconds = out.pop("step_seconds")  # benchmarks read it
        self.updates += 1
        self.total_steps += self.steps
        self.rollbacks += int(out["rolled_back"])
        out["step_scale"] = self.step_scale
        self.step_scale = STEP_SHRINK * self.step_scale if out["rolled_back"] else min(1.0, STEP_GROW * self.step_scale)
        seconds = time.perf_counter() - t0
        result = {**out, "rollbacks": float(self.rollbacks), "seconds": seconds,
                  "seconds_per_step": seconds / self.steps,
                  "data_term_exact": float(self.mode == "exact"), "active": float((self.prior.w > 0).sum())}
        self.history.append({"epoch": epoch, **result})
        self._log_update(epoch, out, seconds)
        return result

    def _fit_posterior(self, epoch: int) -> dict:
        """The paper's objective, KL(pi_Uw || pi_X) (eq. 17-19)."""
        prior = self.prior
        return fit(lambda x, z: self.likelihood.pairwise_log_prob(x, self.decode(z, 0, z.shape[0], None)),
                   prior.U, prior.w, self.sample_z,
                   lambda z: self.data_term(self.decode(z, 0, z.shape[0], None), None),
                   n_data=self.n_data, steps=self.steps, samples=self.samples, seed=self.seed,
                   schedule=self.schedule, lr_w=self.lr, lr_u=self.lr_u, domain=self.likelihood.domain,
                   adam=self.adam, epoch=epoch, safeguard=self.safeguard, step_scale=self.step_scale,
                   pieces=self.pieces, fused=self.fused)

    def _fit_exemplar(self, epoch: int) -> dict:
        """The Exemplar prior's cross-entropy (bype/coreset_exemplar.py); the training means encoded once."""
        x = self.data.train_split().x
        dev = self.prior.U.device

        def rows(lo: int, hi: int) -> torch.Tensor:
            return x[lo:hi].reshape(hi - lo, -1).to(dev).float() / 255.0

        def encode(u: torch.Tensor) -> torch.Tensor:
            return self.model.encode_flat(u)[0]

        lr_u, lr_w = self.exemplar_lrs()
        out = fit_exemplar(encode, self.prior.U, self.prior.w, all_means(encode, rows, x.shape[0]),
                           self.prior.log_var, n_data=self.n_data, steps=self.steps, draws=self.samples,
                           seed_of=lambda step: step_seed(self.seed, epoch, step), lr_u=lr_u, lr_w=lr_w,
                           domain=self.likelihood.domain, safeguard=self.safeguard)
        out.update(skipped_steps=0.0, weight_resets=0.0)
        return out

    def _log_update(self, epoch: int, out: dict, seconds: float) -> None:
        gap = (f"weighted-mean gap {out['mean_gap_before']:.4g} -> {out['mean_gap_after']:.4g}, "
               f"w in [{out['w_min']:.3g}, {out['w_max']:.3g}] (ESS {out['w_ess']:.1f}), "
               f"|ΔU| {out['u_mean_abs_change']:.3g}, {self.steps} steps, {seconds:.2f} s")
        if self.objective == "exemplar":
            if out["rolled_back"]:
                log.warning("coreset: epoch %d: update rolled back (held-out cross-entropy %.4f -> %.4f); %d so far",
                            epoch, out["heldout_ce_before"], out["heldout_ce_after"], self.rollbacks)
            log.info("coreset update at epoch %d: held-out cross-entropy to the Exemplar prior %.4f -> %.4f "
                     "(gap to its own %.4f -> %.4f nats), %s", epoch, out["heldout_ce_before"],
                     out["heldout_ce_after"], out["heldout_ce_gap_before"], out["heldout_ce_gap_after"], gap)
            return
        if out["skipped_steps"]:
            log.warning("coreset: epoch %d: %d of %d steps skipped (non-finite gradients)", epoch,
                        out["skipped_steps"], self.steps)
        if out["rolled_back"]:
            log.warning("coreset: epoch %d: update rolled back (held-out ½Var(R) %.4g -> %.4g); %d so far", epoch,
                        out["heldout_half_var_before"], out["heldout_half_var_after"], self.rollbacks)
        log.info("coreset update at epoch %d: held-out ½Var(R) %.4g -> %.4g, ESS %.1f -> %.1f of %d, %s", epoch,
                 out["heldout_half_var_before"], out["heldout_half_var_after"], out["heldout_ess_before"],
                 out["heldout_ess_after"], self.samples, gap)

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but U and w (those live in the model's state): Adam, counters, history."""
        return {"version": STATE_VERSION, "adam": self.adam.state_dict(), "updates": self.updates,
                "total_steps": self.total_steps, "rollbacks": self.rollbacks, "step_scale": self.step_scale,
                "history": [dict(h) for h in self.history], "trace": list(self.trace), "data_term": self.mode}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("version", "adam", "updates", "total_steps", "history", "trace") if k not in state]
        if missing:
            raise ValueError(f"coreset state: missing key {missing[0]!r}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"coreset state: version {state['version']}, this code reads {STATE_VERSION}")
        self.adam.load_state_dict(state["adam"])
        self.updates, self.total_steps = int(state["updates"]), int(state["total_steps"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.step_scale = float(state.get("step_scale", 1.0))
        self.history = [dict(h) for h in state["history"]]
        self.trace = list(state["trace"])
