"""The data term of the pseudocoreset update: sum_n log p(x_n | z_s) over the whole training set.

Two estimators behind one call `term(params [S, P, D], generator) -> [S]` (float64):

- `ExactDataTerm`: from additive sufficient statistics (Bernoulli: sum_n x_n; Gaussian of fixed variance:
  also sum_n ||x_n||^2), computed once in one pass over the data. O(S D) per step, independent of N.
  With dynamic binarisation the grey levels give the expectation of the binarised data term (it is
  linear in x), so the statistics of the grey levels are exact for that expectation.
- `MinibatchDataTerm`: an unbiased estimate N/B * sum_{b in batch} log p(x_b | z_s) from B rows drawn with
  replacement by the update's generator (Bernoulli rows binarised by the same generator). Every rank draws
  the same rows; with `world_size` > 1 each evaluates its share of them and `all_reduce_sum` completes the
  sum (the optimiser itself shares the samples instead and gives each rank all rows).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from bype.parallel.process_group import all_reduce_sum
from bype.models.likelihoods import Likelihood

MODES = ("auto", "exact", "minibatch")


def has_exact_data_term(likelihood: Likelihood, data_dim: int) -> bool:
    """Whether the likelihood has finite sufficient statistics (Bernoulli, Gaussian: yes; logistic: no)."""
    return likelihood.sufficient_stats(torch.zeros(1, data_dim)) is not None


def resolve_mode(mode: str, likelihood: Likelihood, data_dim: int) -> str:
    if mode not in MODES:
        raise ValueError(f"coreset.data_term: {mode!r} is not one of {', '.join(MODES)}")
    exact = has_exact_data_term(likelihood, data_dim)
    if mode == "exact" and not exact:
        raise ValueError(f"coreset.data_term: exact needs sufficient statistics; the {likelihood.name} likelihood "
                         "has none (use auto or minibatch)")
    if mode == "auto":
        return "exact" if exact else "minibatch"
    return mode


def stream_stats(x: torch.Tensor, chunk: int = 16384) -> dict:
    """Sufficient statistics (n, sum_x float64 [D], sum_sq) of uint8 images [N, ...] as grey levels in
    [0, 1], in one chunked pass over the integer levels, exactly: a chunk's column sums (at most
    16384 * 255 < 2^24) are exact in a float32 product with a ones vector, and sum_sq comes from the
    histogram of the 256 levels. One division by 255 (255^2) at the end."""
    if x.dtype != torch.uint8:
        raise ValueError(f"stream_stats: expected uint8 images, got {x.dtype}")
    chunk = min(chunk, 2**24 // 255)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    sum_x = torch.zeros(flat.shape[1], dtype=torch.float64)
    hist = torch.zeros(256, dtype=torch.int64)
    for rows in flat.split(chunk):
        sum_x += (torch.ones(1, rows.shape[0]) @ rows.float())[0].double()
        hist += torch.bincount(rows.flatten(), minlength=256)
    sum_sq = (hist.double() * torch.arange(256, dtype=torch.float64) ** 2).sum()
    return {"n": n, "sum_x": sum_x / 255.0, "sum_sq": sum_sq / 255.0**2}


class ExactDataTerm:
    mode = "exact"

    def __init__(self, likelihood: Likelihood, stats: dict, data_dim: int, device: torch.device):
        for key in ("n", "sum_x"):
            if key not in stats:
                raise ValueError(f"data.stats: missing {key!r} needed by the exact {likelihood.name} data term")
        sum_x = torch.as_tensor(stats["sum_x"], dtype=torch.float64).reshape(-1)
        if sum_x.numel() != data_dim:
            raise ValueError(f"data.stats: sum_x has {sum_x.numel()} entries, expected D={data_dim}")
        self.stats = {"n": int(stats["n"]), "sum_x": sum_x.to(device)}
        if "sum_sq" in stats:
            self.stats["sum_sq"] = torch.as_tensor(stats["sum_sq"], dtype=torch.float64, device=device)
        elif likelihood.name == "gaussian":
            raise ValueError("data.stats: missing 'sum_sq' needed by the exact gaussian data term")
        self.likelihood = likelihood

    def __call__(self, params: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.likelihood.data_term(self.stats, params.double())


class MinibatchDataTerm:
    mode = "minibatch"

    def __init__(self, likelihood: Likelihood, rows: Callable[[torch.Tensor], torch.Tensor], n_data: int,
                 batch_size: int, rank: int = 0, world_size: int = 1):
        """`rows(idx)` returns the grey levels [len(idx), D] (float, in [0, 1]) of training rows `idx`."""
        self.likelihood, self.rows, self.n = likelihood, rows, n_data
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __call__(self, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dev = params.device
        # The whole global batch is drawn on every rank (same generator), so ranks agree on it.
        idx = torch.randint(self.n, (self.batch_size,), generator=generator, device=generator.device)
        mine = slice(self.rank, None, self.world_size)
        x = self.rows(idx[mine].cpu()).to(dev, params.dtype)
        if self.likelihood.name == "bernoulli":
            u = torch.rand((self.batch_size, x.shape[1]), generator=generator, device=generator.device)
            x = (u[mine].to(dev) < x).to(params.dtype)
        part = self.likelihood.pairwise_log_prob(x, params).double().sum(0)
        if self.world_size > 1:  # rows shared between ranks; with samples shared (the optimiser) each has all rows
            part = all_reduce_sum(part)
        return part * (self.n / self.batch_size)


def split_rows(split) -> Callable[[torch.Tensor], torch.Tensor]:
    """Row access into an in-memory `Split` (uint8 [N, C, H, W]) as flattened grey levels."""
    def rows(idx: torch.Tensor) -> torch.Tensor:
        return split.x[idx].reshape(len(idx), -1).float() / 255.0
    return rows


def build_data_term(mode: str, likelihood: Likelihood, data, data_dim: int, batch_size: int,
                    device: torch.device, rank: int = 0, world_size: int = 1):
    """`mode` already resolved ("exact" | "minibatch"); `data` a DataBundle (stats, n_train, train_split)."""
    if mode == "exact":
        return ExactDataTerm(likelihood, data.stats, data_dim, device)
    return MinibatchDataTerm(likelihood, split_rows(data.train_split()), data.n_train,
                             min(batch_size, data.n_train), rank, world_size)
