"""The pseudocoreset optimiser (DESIGN section 2, Algorithm 2; maths in docs/CORESET.md).

With f(x, z) = log p(x|z), pi_X ∝ exp(sum_n f(x_n, z)) p0(z) and pi_Uw ∝ exp(sum_m w_m f(u_m, z)) p0(z),
the pseudodata U and weights w minimise KL(pi_Uw || pi_X), whose gradients are covariances under pi_Uw
with the residual R(z) = sum_n f(x_n, z) - sum_m w_m f(u_m, z):

    grad_w   = -Cov[f(U, z), R(z)]            grad_u_m = -w_m Cov[grad_u f(u_m, z), R(z)]

`kl_gradients` is the Monte Carlo estimate for any differentiable log-likelihood; `PseudocoresetOptimizer`
runs the update inside training: z from the mixture prior, the data term exact from sufficient statistics
where the likelihood has them, closed-form (or fused-kernel) gradients, Adam, projection onto the
constraints w >= 0, sum(w) = N, U in the data domain.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from typing import Callable, Optional

import torch
from torch import nn

from bype.coreset_data import build_data_term, resolve_mode

log = logging.getLogger("bype")

STATE_VERSION = 1
KERNEL_LIKELIHOODS = ("bernoulli", "logistic")  # the ones kernels.coreset_grads fuses
GRAD_PATHS = ("auto", "kernel", "closed_form", "autograd")
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
        import kernels

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
    import kernels

    if likelihood.name in KERNEL_LIKELIHOODS and hasattr(kernels, "coreset_grads"):
        return "kernel"
    probe = likelihood.grad_u_contract(torch.zeros(1, 1), torch.zeros(2, likelihood.planes, 1), torch.zeros(2))
    return "closed_form" if probe is not None else "autograd"


def kl_estimate(residual: torch.Tensor) -> float:
    """KL(pi_Uw || pi_X) from samples of pi_Uw: pi_X ∝ e^R pi_Uw, so KL = log E[e^R] - E[R] exactly;
    estimated with the same samples (invariant to a constant shift of R, so R~ will do)."""
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


# --- the optimiser --------------------------------------------------------------------------------
def step_seed(seed: int, epoch: int, step: int) -> int:
    """A 63-bit seed from (seed, epoch, step), the same in every process (unlike Python's str hash)."""
    digest = hashlib.blake2b(f"bype-coreset/{seed}/{epoch}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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
    """Algorithm 2: every `every` epochs, `steps` Adam steps on (U, w) of the model's ByPE prior."""

    def __init__(self, model: nn.Module, data, *, every: int = 10, steps: Optional[int] = None,
                 samples: Optional[int] = None, batch_size: int = 100, lr: float = 0.5, lr_u: float = 0.05,
                 data_term: str = "auto", seed: int = 0, ctx=None, grad_path: str = "auto"):
        prior = model.prior
        if getattr(prior, "kind", None) != "bype":
            raise ValueError(f"prior.kind: the pseudocoreset optimiser needs the bype prior, got {prior.kind!r}")
        self.model, self.prior, self.likelihood = model, prior, model.likelihood
        self.n_data = int(data.n_train)
        self.every, self.lr, self.lr_u, self.seed = every, lr, lr_u, seed
        self.steps = steps or max(1, self.n_data // batch_size)
        self.samples = samples or prior.n_components
        if self.samples < 2:
            raise ValueError(f"coreset.samples: needs at least 2 samples for a covariance, got {self.samples}")
        self.device = prior.U.device
        self.mode = resolve_mode(data_term, self.likelihood, model.data_dim)
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        self.data_term = build_data_term(self.mode, self.likelihood, data, model.data_dim, batch_size,
                                         self.device, rank, world)
        if grad_path not in GRAD_PATHS:
            raise ValueError(f"grad_path: {grad_path!r} is not one of {', '.join(GRAD_PATHS)}")
        self.grad_path = gradient_path(self.likelihood) if grad_path == "auto" else grad_path
        self.adam = Adam({"U": prior.U.shape, "w": prior.w.shape}, self.device, prior.U.dtype)
        self.updates = 0
        self.total_steps = 0
        self.history: list[dict] = []  # one summary per update
        self.trace: list[float] = []  # the KL estimate at every step of the latest update
        self.step_seconds: list[float] = []
        log.info("coreset: %s data term, %s gradients, M=%d, S=%d, %d steps every %d epochs, "
                 "step sizes w %g/(j+1), U %g/(j+1)", self.mode, self.grad_path, prior.n_components,
                 self.samples, self.steps, every, lr, lr_u)

    @classmethod
    def from_config(cls, cfg, model: nn.Module, data, ctx) -> "PseudocoresetOptimizer":
        c = cfg.coreset
        return cls(model, data, every=c.every, steps=c.steps, samples=c.samples, batch_size=c.batch_size,
                   lr=c.lr, lr_u=c.lr_u, data_term=c.data_term, seed=cfg.seed, ctx=ctx)

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0

    # --- one step ---------------------------------------------------------------------------------
    def _generator(self, epoch: int, step: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(step_seed(self.seed, epoch, step))

    def sample_z(self, generator: torch.Generator) -> torch.Tensor:
        """Algorithm 1, steps 1-2: m ~ Cat(w / N), z ~ N(mu(u_m), s2 I)."""
        prior = self.prior
        pick = torch.multinomial(prior.w / prior.w.sum(), self.samples, replacement=True, generator=generator)
        mu = self.model.encode_flat(prior.U)[0][pick]
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * prior.log_var)

    def _evaluate(self, epoch: int, step: int):
        """Samples, decoder outputs, data term and gradients at the current (U, w)."""
        g = self._generator(epoch, step)
        params = self.model.decode_params(self.sample_z(g), g)
        data_term = self.data_term(params, g)
        return likelihood_gradients(self.likelihood, self.prior.U, self.prior.w, params, data_term,
                                    self.grad_path)

    def update(self, epoch: int) -> dict:
        """One pseudocoreset update (the VAE frozen); returns floats logged as coreset_<key>."""
        t0 = time.perf_counter()
        prior = self.prior
        trace, skipped, resets = [], 0, 0
        self.step_seconds = []  # wall time of each step of this update (benchmarks read it)
        with frozen(self.model):
            for j in range(self.steps):
                t_step = time.perf_counter()
                grad_U, grad_w, R_c = self._evaluate(epoch, j)
                trace.append(kl_estimate(R_c))
                if not (torch.isfinite(grad_U).all() and torch.isfinite(grad_w).all()):
                    skipped += 1  # a non-finite gradient would poison U, w and the Adam moments
                    continue
                self.adam.step({"U": prior.U, "w": prior.w}, {"U": grad_U, "w": grad_w},
                               {"U": self.lr_u / (j + 1), "w": self.lr / (j + 1)})
                project_pseudodata(prior.U, self.likelihood.domain)
                if project_weights(prior.w, self.n_data):
                    resets += 1
                    log.warning("coreset: epoch %d step %d: every weight reached 0; reset to N/M", epoch, j)
                self.step_seconds.append(time.perf_counter() - t_step)
            step_seconds = (time.perf_counter() - t0) / self.steps
            # The KL after the update, at the final (U, w) with the random numbers of step 0: a paired
            # comparison with kl_before, so the difference is not buried in Monte Carlo noise.
            kl_after = kl_estimate(self._evaluate(epoch, 0)[2])
        self.updates += 1
        self.total_steps += self.steps
        self.trace = trace
        w = prior.w.double()
        result = {"kl_before": trace[0], "kl_after": kl_after, "steps": float(self.steps),
                  "seconds": time.perf_counter() - t0, "seconds_per_step": step_seconds,
                  "data_term_exact": float(self.mode == "exact"),
                  "skipped_steps": float(skipped), "weight_resets": float(resets),
                  "active": float((w > 0).sum()), "ess": float(w.sum() ** 2 / (w**2).sum())}
        self.history.append({"epoch": epoch, **result})
        if skipped:
            log.warning("coreset: epoch %d: %d of %d steps skipped (non-finite gradients)", epoch, skipped, self.steps)
        log.info("coreset update at epoch %d: KL %.4g -> %.4g, %d steps (%s data term), %.2f s",
                 epoch, result["kl_before"], kl_after, self.steps, self.mode, result["seconds"])
        return result

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but U and w (those live in the model's state): Adam, counters, KL history."""
        return {"version": STATE_VERSION, "adam": self.adam.state_dict(), "updates": self.updates,
                "total_steps": self.total_steps, "history": [dict(h) for h in self.history],
                "trace": list(self.trace), "data_term": self.mode}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("version", "adam", "updates", "total_steps", "history", "trace") if k not in state]
        if missing:
            raise ValueError(f"coreset state: missing key {missing[0]!r}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"coreset state: version {state['version']}, this code reads {STATE_VERSION}")
        self.adam.load_state_dict(state["adam"])
        self.updates, self.total_steps = int(state["updates"]), int(state["total_steps"])
        self.history = [dict(h) for h in state["history"]]
        self.trace = list(state["trace"])
