"""Evaluation: importance-sampled test NLL, ELBO, bits/dim, kNN accuracy on encoder means."""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from bype.data.memory import Split, iterate_eval

EVAL_SEED = 20211206  # fixed binarisation of validation / test data: the same inputs every evaluation


def _eval_batches(model, split: Split, batch_size: int):
    """Flattened model inputs of a split, batch by batch; Bernoulli data binarised with a fixed seed,
    so every evaluation (NLL, validation, kNN) sees the same inputs."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    dev = next(model.parameters()).device
    for x, _ in iterate_eval(split, batch_size):
        yield model.preprocess(x, generator=g).to(dev)


@torch.no_grad()
def model_inputs(model, split: Split, batch_size: int = 1000) -> torch.Tensor:
    """Flattened model inputs of a whole split (see _eval_batches)."""
    return torch.cat(list(_eval_batches(model, split, batch_size)))


@torch.no_grad()
def validation_loss(model, x: torch.Tensor, batch_size: int = 1000, seed: int = EVAL_SEED) -> dict:
    """Negative ELBO (beta = 1) averaged over `x`, with fixed reparameterisation noise."""
    was_training = model.training
    model.eval()
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        tot = {"loss": 0.0, "rec": 0.0, "kl": 0.0}
        for xb in x.split(batch_size):
            loss, stats = model.loss(xb, None, 1.0)
            tot["loss"] += loss.item() * xb.shape[0]
            tot["rec"] += stats["rec"].item() * xb.shape[0]
            tot["kl"] += stats["kl"].item() * xb.shape[0]
    model.train(was_training)
    return {k: v / x.shape[0] for k, v in tot.items()}


@torch.no_grad()
def importance_sampled_ll(model, x: torch.Tensor, n_samples: int, max_rows: int = 50000,
                          progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example IS estimate log (1/S) sum_s w_s and the ELBO estimate mean_s log w_s.

    At most `max_rows` (examples x samples) are evaluated at once, so memory stays bounded for S = 5000.
    """
    model.eval()
    per_chunk = max(1, max_rows // n_samples)
    s_chunk = min(n_samples, max_rows)
    ll, elbo = [], []
    for xb in x.split(per_chunk):
        pieces = []
        done = 0
        while done < n_samples:
            s = min(s_chunk, n_samples - done)
            pieces.append(model.log_weights_is(xb, s).double())
            done += s
        lw = torch.cat(pieces, 1)
        ll.append(torch.logsumexp(lw, 1) - math.log(n_samples))
        elbo.append(lw.mean(1))
        if progress is not None:
            progress(xb.shape[0])
    return torch.cat(ll), torch.cat(elbo)


@torch.no_grad()
def encoder_means(model, split: Split, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([model.encode_flat(x)[0].cpu() for x in _eval_batches(model, split, batch_size)])


def knn_accuracy(model, train: Split, test: Split, ks: list[int]) -> dict[str, float]:
    """kNN classification (Euclidean) on encoder means: train(+val) as the reference set, test queried."""
    from sklearn.neighbors import KNeighborsClassifier

    ref, query = encoder_means(model, train).numpy(), encoder_means(model, test).numpy()
    out = {}
    for k in ks:
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(ref, train.y.numpy())
        out[f"knn_{k}"] = float((clf.predict(query) == test.y.numpy()).mean())
    return out


def evaluate(model, test: Split, reference: Split, n_samples: int, max_rows: int, knn_k: list[int],
             limit: Optional[int] = None, log=print) -> dict:
    """The report of a trained model: test NLL (nats, and bits/dim for 8-bit data), ELBO, kNN."""
    test = test.head(limit)
    t0 = time.time()
    x = model_inputs(model, test)
    n, seen = x.shape[0], [0]

    def progress(k):
        seen[0] += k
        rate = seen[0] / max(time.time() - t0, 1e-9)
        if seen[0] == n or seen[0] % max(1, n // 10) < k:
            log(f"eval: {seen[0]}/{n} examples, {rate:.1f} ex/s, ETA {(n - seen[0]) / rate:.0f}s")

    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(EVAL_SEED)
        ll, elbo = importance_sampled_ll(model, x, n_samples, max_rows, progress)
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
        report.update(knn_accuracy(model, reference, test, knn_k))
    return report
