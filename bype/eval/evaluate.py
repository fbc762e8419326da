"""Evaluation: importance-sampled test NLL, ELBO, bits/dim, kNN accuracy on encoder means.

Memory: every evaluation runs in chunks whose size `bype.memory` measures against the budget
`eval.memory_mb` (the data dimension and the architecture decide the bytes per row); `eval.is_batch`
(`bype eval --batch`) only caps the examples x samples of one chunk. Inputs are read from the uint8
split chunk by chunk, never materialised whole as floats.

Noise: the fixed binarisation of Bernoulli data and the importance samples are keyed by example and
sample index (`bype.eval.noise`), so results do not depend on the chunking or on the number of ranks.

Sharding: with a DistContext of W ranks each rank evaluates a contiguous slice of the examples; per-example
results are all-gathered in order and sums all-reduced in float64, so every rank ends with the numbers one
process computes (rank 0 reports them).
"""
from __future__ import annotations

import math
import time
from typing import Optional, Union

import torch

from bype.data.memory import Split
from bype.memory import DEFAULT_MEMORY_MB, chunked_encoder, encode_rows, rows_within
from bype.eval.noise import IndexNoise
from bype.parallel.gather import gather_rows
from bype.parallel.process_group import sum_over_ranks
from bype.parallel.shard import shard_range, shard_sizes

EVAL_SEED = 20211206  # the fixed binarisation and importance samples: the same inputs every evaluation
VAL, TEST, REFERENCE = 1, 2, 3  # noise streams: one split's binarisation is not another's
Inputs = Union[Split, torch.Tensor]  # a uint8 split, or model inputs already flattened and binarised


def _world(ctx) -> tuple[int, int]:
    return (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def chunk_inputs(model, data: Inputs, start: int, stop: int, stream: int) -> torch.Tensor:
    """Flattened model inputs of examples [start, stop); Bernoulli data binarised by example index."""
    if isinstance(data, torch.Tensor):
        return data[start:stop].to(_device(model))
    x = data.x[start:stop].to(_device(model)).float().div_(255.0)
    return model.preprocess(x, IndexNoise(EVAL_SEED, stream, torch.arange(start, stop)))


def _count(data: Inputs) -> int:
    return data.shape[0] if isinstance(data, torch.Tensor) else len(data)


@torch.no_grad()
def model_inputs(model, split: Split, batch_size: int = 1000, stream: int = TEST) -> torch.Tensor:
    """Flattened model inputs of a whole split (small data sets only: evaluation itself reads chunks)."""
    return torch.cat([chunk_inputs(model, split, a, min(a + batch_size, len(split)), stream)
                      for a in range(0, len(split), batch_size)])


def _encoder_chunk(model, memory_mb: float) -> int:
    return encode_rows(model, model.data_dim, memory_mb)


@torch.no_grad()
def validation_loss(model, data: Inputs, batch_size: Optional[int] = None, seed: int = EVAL_SEED,
                    ctx=None, memory_mb: float = DEFAULT_MEMORY_MB) -> dict:
    """Negative ELBO (beta = 1) averaged over `data`, with noise keyed by example index (fixed).

    `batch_size` None: chunks sized by the memory budget. Sharded over the ranks of `ctx`."""
    was_training = model.training
    model.eval()
    rank, world = _world(ctx)
    n = _count(data)
    lo, hi = shard_range(n, rank, world)
    try:
        with chunked_encoder(model, _encoder_chunk(model, memory_mb)):
            probe = chunk_inputs(model, data, 0, 1, VAL)
            rows = batch_size or rows_within(lambda k: model.loss(probe.repeat(k, 1), None, 1.0),
                                             _device(model), "validation", memory_mb=memory_mb)
            tot = [0.0, 0.0, 0.0]
            for a in range(lo, hi, rows):
                b = min(a + rows, hi)
                x = chunk_inputs(model, data, a, b, VAL)
                loss, stats = model.loss(x, None, 1.0, IndexNoise(seed, VAL, torch.arange(a, b)))
                for i, v in enumerate((loss, stats["rec"], stats["kl"])):
                    tot[i] += v.item() * (b - a)
    finally:
        model.train(was_training)
    tot = sum_over_ranks(tot)
    return {k: v / n for k, v in zip(("loss", "rec", "kl"), tot)}


@torch.no_grad()
def importance_sampled_ll(model, data: Inputs, n_samples: int, max_rows: Optional[int] = None,
                          progress=None, stream: int = TEST, ctx=None,
                          log_weights=None, memory_mb: float = DEFAULT_MEMORY_MB) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example IS estimate log (1/S) sum_s w_s and the ELBO estimate mean_s log w_s (all examples,
    on every rank; each rank computes its slice).

    A chunk holds as many (example x sample) rows as the memory budget allows, at most `max_rows`; when
    fewer than S fit, an example's samples are split over several chunks. `log_weights(x, k, noise)` replaces
    `model.log_weights_is`; it may return [b, k, P] (P variants of the weights on the same samples, e.g.
    under P priors: bype.eval.priors), and the results are then [n, P].
    """
    model.eval()
    log_weights = log_weights or model.log_weights_is
    rank, world = _world(ctx)
    n = _count(data)
    lo, hi = shard_range(n, rank, world)
    ll, elbo = [], []
    with chunked_encoder(model, _encoder_chunk(model, memory_mb)):
        probe = chunk_inputs(model, data, 0, 1, stream)
        rows = rows_within(lambda k: log_weights(probe, k), _device(model), "importance sampling",
                           cap=max_rows, memory_mb=memory_mb)
        tail = tuple(log_weights(probe, 1).shape[2:])  # () or (P,)
        per_chunk, s_chunk = max(1, rows // n_samples), min(n_samples, rows)
        for a in range(lo, hi, per_chunk):
            b = min(a + per_chunk, hi)
            x = chunk_inputs(model, data, a, b, stream)
            pieces = []
            for s0 in range(0, n_samples, s_chunk):
                s1 = min(s0 + s_chunk, n_samples)
                noise = IndexNoise(EVAL_SEED, stream, torch.arange(a, b), s0, s1)
                pieces.append(log_weights(x, s1 - s0, noise).double())
            lw = torch.cat(pieces, 1)
            ll.append(torch.logsumexp(lw, 1) - math.log(n_samples))
            elbo.append(lw.mean(1))
            if progress is not None:
                progress(b - a)
    empty = torch.zeros((0, *tail), dtype=torch.float64, device=_device(model))  # a rank without examples
    ll, elbo = (torch.cat(v) if v else empty for v in (ll, elbo))
    return gather_rows(ll, shard_sizes(n, world)), gather_rows(elbo, shard_sizes(n, world))


@torch.no_grad()
def encoder_means(model, split: Split, stream: int = REFERENCE, lo: int = 0, hi: Optional[int] = None,
                  memory_mb: float = DEFAULT_MEMORY_MB) -> torch.Tensor:
    """Encoder means of examples [lo, hi) of a split, on the CPU, in chunks sized by the budget."""
    hi = len(split) if hi is None else hi
    rows = _encoder_chunk(model, memory_mb)
    out = [model.encode_flat(chunk_inputs(model, split, a, min(a + rows, hi), stream))[0].cpu()
           for a in range(lo, hi, rows)]
    return torch.cat(out) if out else torch.zeros(0, model.latent_dim)


def knn_accuracy(model, train: Split, test: Split, ks: list[int], ctx=None,
                 memory_mb: float = DEFAULT_MEMORY_MB) -> dict[str, float]:
    """kNN classification (Euclidean) on encoder means: train(+val) as the reference set, test queried.

    Sharded: the reference means are encoded by slices and all-gathered; each rank classifies its slice of
    the test set and the correct counts are summed."""
    from sklearn.neighbors import KNeighborsClassifier

    rank, world = _world(ctx)
    model.eval()
    ref = gather_rows(encoder_means(model, train, REFERENCE, *shard_range(len(train), rank, world), memory_mb),
                      shard_sizes(len(train), world)).numpy()
    lo, hi = shard_range(len(test), rank, world)
    query = encoder_means(model, test, TEST, lo, hi, memory_mb).numpy()
    correct = []
    for k in ks:
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(ref, train.y.numpy())
        correct.append(float((clf.predict(query) == test.y[lo:hi].numpy()).sum()) if hi > lo else 0.0)
    totals = sum_over_ranks(correct)
    return {f"knn_{k}": c / len(test) for k, c in zip(ks, totals)}


def evaluate(model, test: Split, reference: Split, n_samples: int, max_rows: Optional[int], knn_k: list[int],
             limit: Optional[int] = None, log=print, ctx=None, memory_mb: float = DEFAULT_MEMORY_MB) -> dict:
    """The report of a trained model: test NLL (nats, and bits/dim for 8-bit data), ELBO, kNN, its chunks
    sized to `memory_mb` (eval.memory_mb).

    Every rank of `ctx` must call it; each evaluates its slice and all return the same report."""
    test = test.head(limit)
    n = len(test)
    if n == 0:
        raise ValueError("evaluation: no test examples (--limit / data.eval_limit must be > 0)")
    rank, world = _world(ctx)
    t0 = time.time()
    mine = shard_range(n, rank, world)
    n_mine, seen = mine[1] - mine[0], [0]

    def progress(k):
        seen[0] += k
        rate = seen[0] / max(time.time() - t0, 1e-9)
        if rank == 0 and (seen[0] == n_mine or seen[0] % max(1, n_mine // 10) < k):
            log(f"eval: {seen[0]}/{n_mine} examples" + (f" (rank 0 of {world}, {n} in all)" if world > 1 else "")
                + f", {rate:.1f} ex/s, ETA {(n_mine - seen[0]) / rate:.0f}s")

    ll, elbo = importance_sampled_ll(model, test, n_samples, max_rows, progress, TEST, ctx, memory_mb=memory_mb)
    report = {
        "test_nll": float(-ll.mean()),
        "test_elbo": float(elbo.mean()),
        "is_samples": n_samples,
        "n_test": n,
        "eval_seconds": round(time.time() - t0, 2),
    }
    if model.likelihood.name != "bernoulli":
        report["bits_per_dim"] = report["test_nll"] / (model.data_dim * math.log(2))
    if knn_k:
        report.update(knn_accuracy(model, reference, test, knn_k, ctx, memory_mb))
    return report
