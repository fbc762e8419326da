"""The `exemplar` pseudocoreset objective: fit the coreset mixture to the Exemplar prior (docs/CORESET.md).

The coreset prior p_C(z) = sum_m (w_m / N) N(z; mu(u_m), s2 I) is meant to stand in for the Exemplar prior
p_E(z) = (1/N) sum_n N(z; mu(x_n), s2 I) over all N training images. This objective fits (U, w) to p_E
directly, by minimising the cross-entropy

    CE(U, w) = -E_{z ~ p_E} log p_C(z)          (= KL(p_E || p_C) + H(p_E); H(p_E) does not depend on U, w)

with the VAE frozen. Each step draws S training images n and z ~ N(mu(x_n), s2 I), evaluates log p_C(z)
with the fused mixture kernel and backpropagates into w and, through the encoder, into U. The
parametrisation keeps the constraints without projections: U = lo + (hi - lo) sigmoid(a) inside the data
domain, w = N softmax(b) (w >= 0, sum w = N). Unlike the paper's objective, it does not degenerate when
log p(x|z) is linear in x: it sees every pseudo-point through its encoding.

Every rank draws the same S points and evaluates its share (shard_range); the gradients of the summed
cross-entropy are all-reduced, so (U, w) stay identical on every rank. The training set's means mu(x_n) are
encoded once per update (each rank its block of rows, gathered by an all-reduce of a zero-padded [N, d]).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

import kernels
from bype.coreset.estimate import weight_summary
from bype.parallel.process_group import all_reduce_sum, rank_and_world
from bype.parallel.gather import gather_rows
from bype.parallel.shard import shard_range, shard_sizes

DEFAULT_LR = 0.05  # Adam on the sigmoid's and the softmax's logits (both scale-free)
DEFAULT_DRAWS = 512  # exemplar draws z ~ p_E per step when coreset.samples is not set
DOMAIN_EPS = 1e-3  # pseudodata at the domain's edge start this far inside it (a finite logit)


def domain_logit(U: torch.Tensor, domain: Optional[tuple]) -> torch.Tensor:
    """The free parameter a with U = lo + (hi - lo) sigmoid(a); the identity without a domain."""
    if domain is None:
        return U.clone()
    lo, hi = domain
    p = ((U - lo) / (hi - lo)).clamp(DOMAIN_EPS, 1 - DOMAIN_EPS)
    return torch.log(p) - torch.log1p(-p)


def domain_map(a: torch.Tensor, domain: Optional[tuple]) -> torch.Tensor:
    if domain is None:
        return a
    lo, hi = domain
    return lo + (hi - lo) * torch.sigmoid(a)


def all_means(encode: Callable[[torch.Tensor], torch.Tensor], rows: Callable[[int, int], torch.Tensor],
              n: int, chunk: int = 4096) -> torch.Tensor:
    """Encoder means [n, d] of rows 0..n-1 (`rows(lo, hi)` gives model inputs). Under torch.distributed each
    rank encodes its block and the blocks are all-gathered in rank order."""
    rank, world = rank_and_world()
    if n < world:  # fewer rows than ranks: every rank encodes them all
        rank, world = 0, 1
    lo, hi = shard_range(n, rank, world)
    mine = torch.cat([encode(rows(s, min(s + chunk, hi))) for s in range(lo, hi, chunk)])
    return gather_rows(mine, shard_sizes(n, world))


def cross_entropy(z: torch.Tensor, means: torch.Tensor, log_w: torch.Tensor, log_var: torch.Tensor,
                  chunk: int = 1024) -> float:
    """-mean_z log sum_m exp(log_w[m]) N(z; means[m], s2 I), in chunks of z (no autograd)."""
    total = 0.0
    with torch.no_grad():
        for zs in z.split(chunk):
            total += float(kernels.mixture_logpdf(zs, means, log_w, log_var).double().sum())
    return -total / z.shape[0]


def fit_exemplar(encode: Callable[[torch.Tensor], torch.Tensor], U: torch.Tensor, w: torch.Tensor,
                 exemplar_means: torch.Tensor, log_var: torch.Tensor, *, n_data: float, steps: int, draws: int,
                 seed_of: Callable[[object], int], lr_u: float = DEFAULT_LR, lr_w: float = DEFAULT_LR,
                 domain: Optional[tuple] = (0.0, 1.0), safeguard: bool = True) -> dict:
    """Fit (U [M, D], w [M]) in place to the Exemplar prior whose component means are `exemplar_means`.

    `encode(u [M, D]) -> mu [M, d]` differentiable in u (the frozen encoder's mean head); `log_var` the
    shared component log-variance log s2; `seed_of(step)` the seed of a step's draws (`"held-out"` for the
    diagnostic draws, the same before and after). `steps` Adam steps of `draws` exemplar draws each, step
    sizes cosine-decayed to 0. With `safeguard` an update whose held-out cross-entropy is worse is undone.
    Returns floats: steps, rolled_back, heldout_ce_before / _after (nats per draw), heldout_ce_exemplar
    (p_E's own cross-entropy on the same draws, an estimate of its entropy), heldout_ce_gap_before / _after
    (their differences: an estimate of KL(p_E || p_C)), w_rel_change, u_mean_abs_change and the weight
    summary; the lists `trace` (the cross-entropy of every step) and `step_seconds`.
    """
    if draws < 1:
        raise ValueError(f"coreset.samples: the exemplar objective needs at least 1 draw per step, got {draws}")
    n_ex, d = exemplar_means.shape
    dev = U.device
    log_var = log_var.detach()
    scale = torch.exp(0.5 * log_var)
    log_n = math.log(n_data)
    rank, world = rank_and_world()

    def draw(step) -> torch.Tensor:
        g = torch.Generator(device=dev).manual_seed(seed_of(step))
        pick = torch.randint(n_ex, (draws,), generator=g, device=dev)
        eps = torch.randn((draws, d), generator=g, device=dev, dtype=exemplar_means.dtype)
        return exemplar_means[pick] + scale * eps

    def held_out_ce() -> float:
        with torch.no_grad():
            mu = encode(U)
        return cross_entropy(z_held, mu, torch.log(w.clamp_min(1e-30)) - log_n, log_var)

    z_held = draw("held-out")
    uniform = torch.full((n_ex,), -math.log(n_ex), device=dev, dtype=exemplar_means.dtype)
    ce_exemplar = cross_entropy(z_held, exemplar_means, uniform, log_var)
    before = held_out_ce()
    U0, w0 = U.clone(), w.clone()
    a = domain_logit(U, domain).requires_grad_(True)
    b = torch.log(w.clamp_min(n_data * 1e-12)).requires_grad_(True)
    opt = torch.optim.Adam([{"params": [a], "lr": lr_u}, {"params": [b], "lr": lr_w}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda j: 0.5 * (1.0 + math.cos(math.pi * j / max(steps, 1))))
    lo, hi = shard_range(draws, rank, world)
    trace, seconds = [], []
    for j in range(steps):
        t0 = time.perf_counter()
        z = draw(j)[lo:hi]
        with torch.enable_grad():
            log_w = torch.log_softmax(b, 0)  # log(w / N), w = N softmax(b)
            log_p = kernels.mixture_logpdf(z, encode(domain_map(a, domain)), log_w, log_var)
            loss = -log_p.sum()
            ga, gb = torch.autograd.grad(loss, (a, b))
        flat = all_reduce_sum(torch.cat([ga.flatten(), gb, loss.detach()[None]]))  # one collective a step
        a.grad = flat[:a.numel()].view_as(a) / draws
        b.grad = flat[a.numel():-1] / draws
        trace.append(float(flat[-1]) / draws)
        opt.step()
        sched.step()
        seconds.append(time.perf_counter() - t0)
    with torch.no_grad():
        U.copy_(domain_map(a.detach(), domain))
        w.copy_(n_data * torch.softmax(b.detach().double(), 0).to(w.dtype))
    after = held_out_ce()
    rolled_back = safeguard and not after <= before  # a NaN compares false: roll back
    if rolled_back:
        U.copy_(U0)
        w.copy_(w0)
    return {"steps": float(steps), "rolled_back": float(rolled_back),
            "heldout_ce_before": before, "heldout_ce_after": after, "heldout_ce_exemplar": ce_exemplar,
            "heldout_ce_gap_before": before - ce_exemplar, "heldout_ce_gap_after": after - ce_exemplar,
            "w_rel_change": float((w.double() - w0.double()).abs().sum() / w0.double().abs().sum()),
            "u_mean_abs_change": float((U - U0).abs().mean()),
            **weight_summary(w), "trace": trace, "step_seconds": seconds}
