"""Monte Carlo gradients of the paper's objective KL(pi_Uw || pi_X) (eq. 18-19; docs/CORESET.md).

With f(x, z) = log p(x|z), pi_X ∝ exp(sum_n f(x_n, z)) p0(z) and pi_Uw ∝ exp(sum_m w_m f(u_m, z)) p0(z),
both gradients are covariances under pi_Uw with the residual R(z) = sum_n f(x_n, z) - sum_m w_m f(u_m, z):

    grad_w   = -Cov[f(U, z), R(z)]            grad_u_m = -w_m Cov[grad_u f(u_m, z), R(z)]

`kl_gradients` is the estimate for any differentiable log-likelihood; `likelihood_gradients` the one for a
`bype` likelihood, through the fused kernel, a closed form or autograd.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

import kernels

KERNEL_LIKELIHOODS = ("bernoulli", "logistic")  # the ones kernels.coreset_grads fuses
GRAD_PATHS = ("auto", "kernel", "closed_form", "autograd")
AUTOGRAD_CHUNK = 2**24  # elements of one [rows, S, D] autograd chunk in the generic path


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
    Biased low and capped near max R - mean R - log S (bype.coreset.estimate.diagnostics, `logmeanexp`)."""
    R = residual.double()
    return float(torch.logsumexp(R, 0) - math.log(R.shape[0]) - R.mean())

