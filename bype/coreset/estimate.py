"""The Monte Carlo estimate behind one pseudocoreset step, sharded over ranks, and its diagnostics.

Every rank draws the same S samples z and evaluates only its share z[lo:hi] (`shard_range`): the
log-likelihoods A [M, S/W] of the pseudodata, the data term and the contraction with the residual.
All-reduces complete the sums: the first (float64) gives the sample means of A and the whole residual
vector R [S], so every rank centres with the global means; then each rank's shares of the covariances
grad_w = -Cov[f(U, z), R] (float64) and grad_U = -w Cov[grad_u f, R] (U's dtype) are summed. One
process skips the collectives and gets the same formula.

Diagnostics of the residual R(z) = sum_n f(x_n, z) - sum_m w_m f(u_m, z) over z ~ pi_Uw, where
KL(pi_Uw || pi_X) = log E[e^R] - E[R]:
- `half_var` = ½ Var(R): the KL when R is Gaussian (a second-order expansion otherwise); its
  estimate does not saturate, so it is the objective the safeguard compares.
- `ess` = (sum e^R)^2 / sum e^2R: how many of the S samples carry the weight of pi_X. Far below S,
  any estimate of the KL from these samples is unreliable.
- `logmeanexp` = log (1/S) sum e^(R - mean R): the plug-in estimate of the KL. Biased low and capped
  at about max R - mean R + log(1/S), so when ESS ~ 1 it measures the spread of R, not the KL.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from bype.parallel.process_group import all_reduce_sum


class Pieces(NamedTuple):
    """One rank's share of a step: A [M, S_loc] and data term [S_loc] (float64), and `contract`:
    coef [S_loc] -> sum_s coef_s grad_u f(u_m, z_s), [M, D] (None when gradients are not needed)."""
    A: torch.Tensor
    data: torch.Tensor
    contract: Callable[[torch.Tensor], torch.Tensor] | None


class Estimate(NamedTuple):
    grad_U: torch.Tensor  # [M, D], U's dtype
    grad_w: torch.Tensor  # [M], w's dtype
    R: torch.Tensor  # [S] centred residual, float64, the same on every rank


def residual(pieces: Pieces, w: torch.Tensor, lo: int, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' residuals as one centred vector R~ [S] and the sample means of A [M] (float64)."""
    A, M = pieces.A, pieces.A.shape[0]
    R_local = pieces.data.double() - w.detach().double() @ A  # the two O(N D) terms nearly cancel: float64
    buf = torch.zeros(M + n_samples, dtype=torch.float64, device=A.device)
    buf[:M] = A.sum(1)
    buf[M + lo:M + lo + R_local.shape[0]] = R_local
    all_reduce_sum(buf)
    R = buf[M:]
    return R - R.mean(), buf[:M] / n_samples


def estimate(pieces: Pieces, U: torch.Tensor, w: torch.Tensor, lo: int, n_samples: int) -> Estimate:
    """grad_U, grad_w (unbiased covariances, 1/(S-1)) and R~ from this rank's `pieces`."""
    R_c, A_mean = residual(pieces, w, lo, n_samples)
    mine = R_c[lo:lo + pieces.A.shape[1]]
    # grad_w's shares are covariances that can cancel between ranks: float64. grad_U's shares are summed
    # in U's dtype (M x D values: half the bytes of float64, one rounding per rank).
    grad_w = all_reduce_sum(-((pieces.A - A_mean[:, None]) @ mine)) / (n_samples - 1)
    grad_U = all_reduce_sum(-(w.detach()[:, None] * pieces.contract(mine.to(U.dtype))).to(U.dtype)) / (n_samples - 1)
    return Estimate(grad_U, grad_w.to(w.dtype), R_c)


def loglik_pieces(loglik: Callable, data_term: Callable, U: torch.Tensor, z: torch.Tensor,
                  with_grad: bool = True) -> Pieces:
    """Pieces for any differentiable `loglik(x [n, D], z [S, d]) -> [n, S]` and `data_term(z) -> [S]`."""
    M, S = U.shape[0], z.shape[0]
    u = U.detach().requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        A = loglik(u, z)
    if A.shape != (M, S):
        raise ValueError(f"loglik(U, z): expected [M, S]=[{M}, {S}], got {list(A.shape)}")
    data = data_term(z).detach().double()
    if data.shape != (S,):
        raise ValueError(f"data_term(z): expected [S]=[{S}], got {list(data.shape)}")

    def contract(coef: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            (g,) = torch.autograd.grad((A * coef.to(A.dtype)).sum(), u, allow_unused=True)
        return torch.zeros_like(U) if g is None else g

    return Pieces(A.detach().double(), data, contract if with_grad else None)


# --- diagnostics ----------------------------------------------------------------------------------
def diagnostics(R: torch.Tensor) -> dict:
    """½Var(R), ESS of e^R and the log-mean-exp of R - mean R (module docstring) from a residual vector."""
    R = R.double()
    R = R - R.mean()
    log_sum = torch.logsumexp(R, 0)
    return {"half_var": float(0.5 * R.var()) if R.numel() > 1 else 0.0,
            "ess": float(torch.exp(2 * log_sum - torch.logsumexp(2 * R, 0))),
            "logmeanexp": float(log_sum - math.log(R.numel()))}


def weight_summary(w: torch.Tensor) -> dict:
    """Range, effective number (sum w)^2 / sum w^2 and count at zero of the weights."""
    w = w.detach().double()
    return {"w_min": float(w.min()), "w_max": float(w.max()), "w_ess": float(w.sum() ** 2 / (w**2).sum()),
            "weights_at_zero": float((w == 0).sum())}
