"""Pure-torch pieces of the pseudocoreset gradient (eq. 18-19 of the ByPE-VAE paper) and its unfused reference.

Likelihood f(x, z) = log p(x | z), summed over pixels d:

* ``bernoulli``: ``params [S, 1, D]`` logits l; ``f = x . l - sum_d softplus(l_d)``,
  ``d f / d x = l``.
* ``logistic``: discretised logistic with 256 bins, ``params [S, 2, D]`` = (mean, log_scale);
  per pixel, with half-bin ``h = 1/510``, ``a = (x - mean + h) e^-log_scale``,
  ``b = (x - mean - h) e^-log_scale``::

      x < h     : logsigmoid(a)                               (left edge bin)
      x > 1 - h : logsigmoid(-b)                              (right edge bin)
      otherwise : logsigmoid(a) + logsigmoid(-b) + log(-expm1(-(a - b)))

  (= log(sigmoid(a) - sigmoid(b)) computed without cancellation). ``d f / d x`` is taken
  w.r.t. continuous x: ``a - b`` does not depend on x, so it is
  ``e^-log_scale * (sigmoid(-a) - sigmoid(b))`` in the middle, ``e^-log_scale sigmoid(-a)``
  on the left edge and ``-e^-log_scale sigmoid(b)`` on the right edge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

HALF_BIN = 1.0 / 510.0
LIKELIHOODS = {"bernoulli": 1, "logistic": 2}  # name -> number of parameter planes P


def logistic_log_pmf(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Per-pixel log-pmf of the 256-bin discretised logistic (broadcasting)."""
    inv = torch.exp(-log_scale)
    a = (x - mean + HALF_BIN) * inv
    b = (x - mean - HALF_BIN) * inv
    mid = F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(-(a - b)))
    return torch.where(x < HALF_BIN, F.logsigmoid(a), torch.where(x > 1.0 - HALF_BIN, F.logsigmoid(-b), mid))


def logistic_dlog_pmf_dx(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """d logistic_log_pmf / d x (continuous x), closed form."""
    inv = torch.exp(-log_scale)
    a = (x - mean + HALF_BIN) * inv
    b = (x - mean - HALF_BIN) * inv
    sa, sb = torch.sigmoid(-a), torch.sigmoid(b)
    return inv * torch.where(x < HALF_BIN, sa, torch.where(x > 1.0 - HALF_BIN, -sb, sa - sb))


def log_prob_elementwise(x: Tensor, params: Tensor, likelihood: str) -> Tensor:
    """log p(x_d | params_d) per pixel; ``params`` broadcast against ``x`` on all but dim -2."""
    if likelihood == "bernoulli":
        logits = params[..., 0, :]
        return x * logits - F.softplus(logits)
    return logistic_log_pmf(x, params[..., 0, :], params[..., 1, :])


def coreset_grads_reference(U: Tensor, w: Tensor, params: Tensor, data_term: Tensor, likelihood: str):
    """The Monte Carlo estimator of eq. 18-19, written literally: materialises
    ``M x S x D`` and takes grad_u f by autograd (per element). For tests at small sizes."""
    M, D = U.shape
    S = params.shape[0]
    X = U[:, None, :].detach().expand(M, S, D).clone().requires_grad_(True)
    with torch.enable_grad():
        f = log_prob_elementwise(X, params.detach()[None], likelihood)  # [M, S, D]
        (grad_u,) = torch.autograd.grad(f.sum(), X)  # d f(u_m, z_s) / d u_m, [M, S, D]
    A = f.detach().sum(-1)  # [M, S]
    R = data_term - w @ A
    A_c = A - A.mean(1, keepdim=True)
    R_c = R - R.mean()
    grad_w = -(A_c @ R_c) / (S - 1)
    grad_U = -w[:, None] * torch.einsum("msd,s->md", grad_u, R_c) / (S - 1)
    return grad_U, grad_w, R_c
