"""Priors p(z) behind one interface: Gaussian, VampPrior, Exemplar, ByPE (pseudocoreset mixture).

`log_prob(z, model, idx=None) -> [B]` needs the model because the mixture components are encoder
outputs (mu(u) for pseudodata or exemplars). Mixture priors evaluate through `kernels.mixture_logpdf`,
the same call in training and evaluation.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

import kernels
from bype.memory import DEFAULT_MEMORY_MB, encode_rows
from bype.parallel import RowShard, all_gather_rows, gather_rows

LOG_2PI = math.log(2 * math.pi)


def normal_logpdf(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


class Prior(nn.Module):
    """`row_shard` (set by the DDP / DeepSpeed engines, None in one process): in the training forward each
    rank encodes only its share of the mixture's rows and all-gathers the encodings with their gradients."""

    kind = "base"
    row_shard: Optional[RowShard] = None

    def _shard(self) -> Optional[RowShard]:
        """The row shard where it applies: the training forward (every rank runs it in lockstep)."""
        return self.row_shard if self.training and torch.is_grad_enabled() else None

    def encode_rows(self, model: nn.Module, rows, n: int, diag: bool = False) -> torch.Tensor:
        """Encoder means of the n mixture rows (with log-variances concatenated on the last dim when `diag`).

        `rows(lo, hi)` returns rows lo..hi-1 as model inputs. Sharded: this rank encodes its block, the
        blocks are all-gathered with autograd (bype.parallel.gather explains why the gradients stay exact).
        """
        shard = self._shard()
        lo, hi = shard.range(n) if shard is not None else (0, n)
        mu, logvar = model.encode_flat(rows(lo, hi))
        out = torch.cat([mu, logvar], -1) if diag else mu
        return all_gather_rows(out, shard.sizes(n), shard.group) if shard is not None else out

    def log_prob(self, z: torch.Tensor, model: nn.Module, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, model: nn.Module, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def n_components(self) -> int:
        return 0

    def init_from_data(self, rows: torch.Tensor, n_data: int) -> None:
        """Initialise data-dependent state from distinct random training images rows [K, D] in [0, 1]
        (K = the number of components) drawn from a training set of `n_data` examples."""

    def on_epoch_start(self, model: nn.Module) -> None:
        """Hook for per-epoch caches."""


class GaussianPrior(Prior):
    kind = "gaussian"

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z, model, idx=None):
        return -0.5 * (LOG_2PI + z**2).sum(-1)

    def sample(self, n, model, generator=None):
        dev = next(model.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator, device=dev)


def _gaussian_around(mu: torch.Tensor, logvar: torch.Tensor, generator) -> torch.Tensor:
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def _logit(x: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x) - torch.log1p(-x)


class VampPrior(Prior):
    """(1/K) sum_k q(z | u_k) with learned pseudo-inputs u_k = sigmoid(raw_k) in the data domain."""

    kind = "vampprior"

    def __init__(self, n_components: int, data_dim: int):
        super().__init__()
        self.pseudo_raw = nn.Parameter(torch.zeros(n_components, data_dim))

    @property
    def n_components(self) -> int:
        return self.pseudo_raw.shape[0]

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.pseudo_raw)

    def init_from_data(self, rows, n_data):
        with torch.no_grad():
            self.pseudo_raw.copy_(_logit(rows.to(self.pseudo_raw)))

    def log_prob(self, z, model, idx=None):
        k = self.n_components
        enc = self.encode_rows(model, lambda lo, hi: torch.sigmoid(self.pseudo_raw[lo:hi]), k, diag=True)
        mu, logvar = enc.split(enc.shape[-1] // 2, -1)
        log_w = torch.full((k,), -math.log(k), device=z.device, dtype=z.dtype)
        return kernels.mixture_logpdf(z, mu, log_w, logvar)

    def sample(self, n, model, generator=None):
        mu, logvar = model.encode_flat(self.pseudo_inputs)
        pick = torch.randint(mu.shape[0], (n,), generator=generator, device=mu.device)
        return _gaussian_around(mu[pick], logvar[pick], generator)


class ExemplarPrior(Prior):
    """(1/N) sum_n N(z; mu(x_n), s2 I) over the training set, leave-one-out.

    Training draws `subset` exemplars per minibatch and drops those in the batch itself, so no example
    serves as its own exemplar. With `knn > 0` each z keeps only its k nearest exemplars, found in a
    latent cache refreshed every epoch (the Exemplar VAE's retrieval mode). Evaluation uses all N.
    """

    kind = "exemplar"

    def __init__(self, bank: torch.Tensor, subset: int, knn: int, log_var_init: float,
                 memory_mb: float = DEFAULT_MEMORY_MB):
        super().__init__()
        self.memory_mb = memory_mb  # encoding the bank runs in chunks sized to this budget (eval.memory_mb)
        # Flattened training images [N, D], kept as uint8 (4x smaller than floats; CelebA-sized banks).
        self.register_buffer("bank", _as_uint8(bank), persistent=False)
        self.subset = subset
        self.knn = knn
        self.log_var = nn.Parameter(torch.tensor(float(log_var_init)))
        self._knn_cache: Optional[torch.Tensor] = None  # refreshed each epoch (retrieval mode)
        self._eval_cache: Optional[torch.Tensor] = None  # all N means, valid while the model is frozen

    def train(self, mode: bool = True):
        self._eval_cache = None  # the encoder changes between evaluations
        return super().train(mode)

    def _rows(self, pick: torch.Tensor) -> torch.Tensor:
        return self.bank[pick].float() / 255.0

    @torch.no_grad()
    def _all_means(self, model, bank: Optional[torch.Tensor] = None) -> torch.Tensor:
        bank = self.bank if bank is None else bank
        chunk = encode_rows(model, bank.shape[1], self.memory_mb)
        return torch.cat([model.encode_flat(b.float() / 255.0)[0] for b in bank.split(chunk)])

    def on_epoch_start(self, model):
        """The kNN cache: each rank encodes its block of the bank and the blocks are all-gathered."""
        if self.knn <= 0:
            self._knn_cache = None
        elif self.row_shard is None:
            self._knn_cache = self._all_means(model)
        else:
            n = self.bank.shape[0]
            lo, hi = self.row_shard.range(n)
            self._knn_cache = gather_rows(self._all_means(model, bank=self.bank[lo:hi]),
                                          self.row_shard.sizes(n), self.row_shard.group)

    def log_prob(self, z, model, idx=None):
        n = self.bank.shape[0]
        if not self.training:
            if self._eval_cache is None:
                self._eval_cache = self._all_means(model)
            log_w = torch.full((n,), -math.log(n), device=z.device, dtype=z.dtype)
            return kernels.mixture_logpdf(z, self._eval_cache, log_w, self.log_var)
        if self.knn > 0:
            return self._log_prob_knn(z, model, idx)
        pick = torch.randperm(n, device=self.bank.device)[: self.subset] if 0 < self.subset < n \
            else torch.arange(n, device=self.bank.device)
        if idx is not None:
            if self._shard() is not None:  # leave out the whole global batch, as one process does
                idx = gather_rows(idx, group=self.row_shard.group)
            pick = pick[~torch.isin(pick, idx.to(pick.device))]
        mu = self.encode_rows(model, lambda lo, hi: self._rows(pick[lo:hi]), pick.shape[0])
        log_w = torch.full((mu.shape[0],), -math.log(mu.shape[0]), device=z.device, dtype=z.dtype)
        return kernels.mixture_logpdf(z, mu, log_w, self.log_var)

    def _log_prob_knn(self, z, model, idx):
        if self._knn_cache is None:
            self._knn_cache = self._all_means(model)
        d2 = torch.cdist(z.detach(), self._knn_cache).pow(2)
        if idx is not None:
            d2[torch.arange(z.shape[0], device=z.device)[idx >= 0], idx[idx >= 0]] = float("inf")
        nearest = d2.topk(self.knn, largest=False).indices  # [B, k]
        mu = model.encode_flat(self._rows(nearest.flatten()))[0].view(z.shape[0], self.knn, -1)
        var = torch.exp(self.log_var)
        comp = -0.5 * (z.shape[1] * (LOG_2PI + self.log_var) + ((z[:, None] - mu) ** 2).sum(-1) / var)
        # Uniform weights 1/N over all exemplars; the others contribute (almost) nothing.
        return torch.logsumexp(comp, -1) - math.log(self.bank.shape[0])

    def sample(self, n, model, generator=None):
        pick = torch.randint(self.bank.shape[0], (n,), generator=generator).to(self.bank.device)
        mu = model.encode_flat(self._rows(pick))[0]
        return _gaussian_around(mu, self.log_var.expand_as(mu), generator)


class ByPEPrior(Prior):
    """Pseudocoreset mixture (eq. 12): (1/N) sum_m w_m N(z; mu(u_m), s2 I), sum(w) = N.

    `U` and `w` are buffers: the VAE optimiser never touches them; the pseudocoreset optimiser does, and
    under data parallelism they are replicated and kept identical by explicit collectives.
    """

    kind = "bype"

    def __init__(self, n_components: int, data_dim: int, log_var_init: float):
        super().__init__()
        self.register_buffer("U", torch.zeros(n_components, data_dim))
        self.register_buffer("w", torch.ones(n_components))
        self.register_buffer("n_data", torch.tensor(float(n_components)))
        self.log_var = nn.Parameter(torch.tensor(float(log_var_init)))

    @property
    def n_components(self) -> int:
        return self.U.shape[0]

    def init_from_data(self, rows, n_data):
        self.U.copy_(rows.to(self.U))
        self.n_data.fill_(float(n_data))
        self.w.fill_(n_data / self.U.shape[0])  # w starts at N/M

    def log_prob(self, z, model, idx=None):
        mu = self.encode_rows(model, lambda lo, hi: self.U[lo:hi], self.n_components)
        log_w = torch.log(self.w.clamp_min(1e-30)).to(z.dtype) - torch.log(self.n_data).to(z.dtype)
        return kernels.mixture_logpdf(z, mu, log_w, self.log_var)

    def sample(self, n, model, generator=None):
        pick = torch.multinomial(self.w / self.w.sum(), n, replacement=True, generator=generator)
        mu = model.encode_flat(self.U[pick])[0]
        return _gaussian_around(mu, self.log_var.expand_as(mu), generator)


def _as_uint8(bank: torch.Tensor) -> torch.Tensor:
    """Grey levels in [0, 1] (or already uint8) -> uint8 rows."""
    if bank.dtype == torch.uint8:
        return bank
    return (bank * 255).round().clamp(0, 255).to(torch.uint8)


def build_prior(cfg, data_dim: int, bank: Optional[torch.Tensor] = None) -> Prior:
    p = cfg.prior
    if p.kind == "gaussian":
        return GaussianPrior(cfg.model.latent_dim)
    if p.kind == "vampprior":
        return VampPrior(p.components, data_dim)
    if p.kind == "bype":
        return ByPEPrior(p.components, data_dim, p.log_var_init)
    if p.kind == "exemplar":
        if bank is None:
            bank = torch.zeros(1, data_dim)
        return ExemplarPrior(bank, p.exemplar.subset, p.exemplar.knn, p.log_var_init, cfg.eval.memory_mb)
    raise ValueError(f"prior.kind: unknown prior {p.kind!r}")
