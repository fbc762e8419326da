"""Decoder likelihoods p(x|z) over flattened images x in [0, 1]^D.

`params` always has shape [B, P, D] (P parameter planes per pixel). Besides the per-example
log-probability each likelihood exposes what the pseudocoreset optimiser needs (docs/CORESET.md):
pairwise log-probabilities, additive sufficient statistics with an exact data term, and the gradient
of log p(u|z) with respect to u contracted against per-sample coefficients.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class Likelihood(nn.Module):
    name = "base"
    planes = 1  # P
    domain = (0.0, 1.0)

    def head(self, raw: torch.Tensor) -> torch.Tensor:
        """Map the decoder's raw output [B, P, D] to likelihood parameters."""
        return raw

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pairwise_log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """[n, D] x [S, P, D] -> [n, S]; the default chunks over n to bound memory."""
        out = []
        chunk = max(1, 2**24 // max(1, params.shape[0] * params.shape[-1]))
        for xs in x.split(chunk):
            out.append(self.log_prob(xs[:, None, :].expand(-1, params.shape[0], -1).reshape(-1, x.shape[1]),
                                     params.repeat(xs.shape[0], 1, 1)).view(xs.shape[0], -1))
        return torch.cat(out)

    def sufficient_stats(self, x: torch.Tensor) -> Optional[dict]:
        return None

    def data_term(self, stats: dict, params: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def grad_u_contract(self, u: torch.Tensor, params: torch.Tensor, coef: torch.Tensor) -> Optional[torch.Tensor]:
        """sum_s coef[s] * d log p(u_m | z_s) / d u_m  -> [M, D], or None without a closed form."""
        return None

    def sample(self, params: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Binary pixels; params are the logits."""

    name = "bernoulli"

    def log_prob(self, x, params):
        logits = params[:, 0]
        return (x * logits - F.softplus(logits)).sum(-1)

    def pairwise_log_prob(self, x, params):
        logits = params[:, 0]
        return x @ logits.T - F.softplus(logits).sum(-1)[None, :]

    def sufficient_stats(self, x):
        return {"n": x.shape[0], "sum_x": x.sum(0, dtype=torch.float64)}

    def data_term(self, stats, params):
        # sum_n [x_n . l - sum_d softplus(l_d)] = (sum_n x_n) . l - N sum_d softplus(l_d): exact, O(D) per z.
        logits = params[:, 0].double()
        return (logits @ stats["sum_x"].to(logits) - stats["n"] * F.softplus(logits).sum(-1)).to(params.dtype)

    def grad_u_contract(self, u, params, coef):
        # d/du [u . l - sum softplus(l)] = l, the same for every u.
        return (coef @ params[:, 0])[None, :].expand(u.shape[0], -1).clone()

    def sample(self, params, generator=None):
        return torch.bernoulli(torch.sigmoid(params[:, 0]), generator=generator)

    def mean(self, params):
        return torch.sigmoid(params[:, 0])


class Gaussian(Likelihood):
    """Gaussian of fixed standard deviation around a mean in [0, 1]."""

    name = "gaussian"

    def __init__(self, std: float):
        super().__init__()
        self.std = float(std)

    def head(self, raw):
        return torch.sigmoid(raw)

    def _const(self, d: int) -> float:
        return -d * (math.log(self.std) + 0.5 * LOG_2PI)

    def log_prob(self, x, params):
        mean = params[:, 0]
        return -0.5 * ((x - mean) ** 2).sum(-1) / self.std**2 + self._const(x.shape[-1])

    def pairwise_log_prob(self, x, params):
        mean = params[:, 0]
        # Differences, not the expanded square: x and mean are both in [0, 1], chunked over S.
        sq = torch.cdist(x, mean).pow(2)
        return -0.5 * sq / self.std**2 + self._const(x.shape[-1])

    def sufficient_stats(self, x):
        return {"n": x.shape[0], "sum_x": x.sum(0, dtype=torch.float64),
                "sum_sq": (x.double() ** 2).sum()}

    def data_term(self, stats, params):
        mean = params[:, 0].double()
        sq = stats["sum_sq"] - 2 * mean @ stats["sum_x"].to(mean) + stats["n"] * (mean**2).sum(-1)
        return (-0.5 * sq / self.std**2 + stats["n"] * self._const(mean.shape[-1])).to(params.dtype)

    def grad_u_contract(self, u, params, coef):
        # d/du log N(u; m_s, t^2) = (m_s - u) / t^2
        return (coef @ params[:, 0] - coef.sum() * u) / self.std**2

    def sample(self, params, generator=None):
        mean = params[:, 0]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + self.std * noise).clamp(0, 1)

    def mean(self, params):
        return params[:, 0]


HALF_BIN = 1.0 / 510.0  # half the width of one of 256 grey levels k/255


def discretized_logistic_logpmf(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per pixel for grey levels x = k/255 under a logistic(mean, scale) discretised to 256 bins.

    The edge bins take the tails, so the 256 probabilities sum to 1. The middle bin uses
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a)), stable in log space and
    smooth in x (the coreset optimiser differentiates it with respect to continuous pseudodata).
    """
    inv_s = torch.exp(-log_scale)
    a = (x - mean + HALF_BIN) * inv_s
    b = (x - mean - HALF_BIN) * inv_s
    mid = F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(-(a - b)))
    low = F.logsigmoid(a)
    high = F.logsigmoid(-b)
    return torch.where(x < HALF_BIN, low, torch.where(x > 1 - HALF_BIN, high, mid))


class DiscretizedLogistic(Likelihood):
    """8-bit images: logistic per pixel discretised to 256 bins, with a learned per-pixel log-scale."""

    name = "logistic"
    planes = 2
    min_log_scale, max_log_scale = -7.0, 0.0

    def head(self, raw):
        mean = torch.sigmoid(raw[:, 0])
        log_scale = raw[:, 1].clamp(self.min_log_scale, self.max_log_scale)
        return torch.stack([mean, log_scale], 1)

    def log_prob(self, x, params):
        return discretized_logistic_logpmf(x, params[:, 0], params[:, 1]).sum(-1)

    def sample(self, params, generator=None):
        mean, log_scale = params[:, 0], params[:, 1]
        u = torch.rand(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype).clamp(1e-5, 1 - 1e-5)
        x = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        return torch.round(x.clamp(0, 1) * 255) / 255

    def mean(self, params):
        return params[:, 0]


def build_likelihood(name: str, gaussian_std: float = 0.1) -> Likelihood:
    if name == "bernoulli":
        return Bernoulli()
    if name == "gaussian":
        return Gaussian(gaussian_std)
    if name == "logistic":
        return DiscretizedLogistic()
    raise ValueError(f"model.likelihood: unknown likelihood {name!r}")
