"""The ceiling of any coreset: a trained run's test NLL under other priors, its networks fixed.

`bype eval RUN --priors own,uniform,random,kmeans,exemplar` swaps the top latent's prior of a trained model
and computes the importance-sampled test NLL under each, with the same random numbers for every prior (the
binarisation and the importance samples are keyed by example and sample index, bype.eval.noise), so the
differences are the priors' alone:

- `own`: the prior the run trained;
- `uniform`: the run's pseudodata with equal weights (ByPE runs);
- `random`: M training images drawn at random (not the run's initial coreset), equal weights;
- `kmeans`: k-means with M centres on the encoded training set, each centre replaced by the training image
  encoded nearest to it, weights proportional to the cluster sizes;
- `exemplar`: all N training images (the Exemplar prior).

Components share the run's variance s2 (ByPE and Exemplar runs) or keep the encoder's diagonal variances
(VampPrior runs, whose components are q(z|u)). `gap_closed` = (NLL_random - NLL_own) / (NLL_random -
NLL_exemplar): the share of the way from M random images to all N that the run's own prior covers.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch import nn

import kernels
from bype.coreset.exemplar import all_means
from bype.memory import DEFAULT_MEMORY_MB, encode_rows
from bype.eval.evaluate import TEST, importance_sampled_ll
from bype.models.priors import Prior
from bype.seeds import derive_seed

PRIORS = ("own", "uniform", "random", "kmeans", "exemplar")
MIXTURE_KINDS = ("bype", "exemplar", "vampprior")


class FixedMixturePrior(Prior):
    """A mixture over fixed rows [K, D] encoded by the frozen model, with log weights log(w_k / sum w).

    `log_var` a 0-dim shared log-variance, or None for the encoder's own diagonal variances (VampPrior
    form). The encodings are computed once (sharded over ranks) and kept: the model must stay frozen."""

    kind = "fixed"

    def __init__(self, rows: torch.Tensor, log_weights: torch.Tensor, log_var: Optional[torch.Tensor],
                 memory_mb: float = DEFAULT_MEMORY_MB):
        super().__init__()
        self.memory_mb = memory_mb
        self.rows, self.log_weights, self.log_var = rows, log_weights, log_var
        self._components: Optional[tuple] = None

    @property
    def n_components(self) -> int:
        return self.rows.shape[0]

    def components(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """(means [K, d], log-variances: the shared 0-dim one or [K, d])."""
        if self._components is None:
            dev = next(model.parameters()).device
            rows = self.rows

            def chunk(lo: int, hi: int) -> torch.Tensor:
                return rows[lo:hi].to(dev).float() / (255.0 if rows.dtype == torch.uint8 else 1.0)

            with torch.no_grad():
                enc = all_means(lambda x: torch.cat(model.encode_flat(x), -1), chunk, rows.shape[0],
                                encode_rows(model, rows.shape[1], self.memory_mb))
            mu, logvar = enc.split(enc.shape[1] // 2, -1)
            self._components = (mu, logvar if self.log_var is None else self.log_var.detach().to(dev))
        return self._components

    def log_prob(self, z, model, idx=None):
        mu, log_var = self.components(model)
        return kernels.mixture_logpdf(z, mu, self.log_weights.to(z.device, z.dtype), log_var.to(z.dtype))


def _uniform(k: int) -> torch.Tensor:
    return torch.full((k,), -math.log(k))


def _shared_log_var(prior) -> Optional[torch.Tensor]:
    """The run's shared component log-variance; None for VampPrior (its components keep their own)."""
    return None if prior.kind == "vampprior" else prior.log_var.detach()


def kmeans_rows(model, train_x: torch.Tensor, m: int, seed: int,
                memory_mb: float = DEFAULT_MEMORY_MB) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (M centres) on the encoder means of the training images; returns (rows [M, D] uint8: the
    image encoded nearest each centre, log weights from the cluster sizes)."""
    from sklearn.cluster import KMeans

    dev = next(model.parameters()).device
    flat = train_x.reshape(train_x.shape[0], -1)
    with torch.no_grad():
        means = all_means(lambda x: model.encode_flat(x)[0], lambda lo, hi: flat[lo:hi].to(dev).float() / 255.0,
                          flat.shape[0], encode_rows(model, flat.shape[1], memory_mb)).cpu().double()
    km = KMeans(n_clusters=m, n_init=1, random_state=seed % 2**31).fit(means.numpy())
    centres = torch.from_numpy(km.cluster_centers_)
    nearest = torch.cdist(centres, means).argmin(1)
    sizes = torch.bincount(torch.from_numpy(km.labels_).long(), minlength=m).double()
    return flat[nearest], torch.log(sizes / sizes.sum()).float()


def build_eval_prior(name: str, own: Prior, model, data, components: int, seed: int,
                     memory_mb: float = DEFAULT_MEMORY_MB) -> Prior:
    """The prior `name` (one of PRIORS) beside the run's own prior `own`; `components` M for random, kmeans."""
    if name == "own":
        return own
    if own.kind not in MIXTURE_KINDS:
        raise ValueError(f"--priors: {name!r} needs a mixture prior; this run's prior is {own.kind!r} (only 'own')")
    log_var = _shared_log_var(own)
    train_x = data.train_split().x
    if name == "uniform":
        if own.kind != "bype":
            raise ValueError(f"--priors: 'uniform' re-weights a ByPE run's pseudodata; this run's prior is {own.kind!r}")
        return FixedMixturePrior(own.U.detach().clone(), _uniform(own.n_components), log_var, memory_mb)
    if name == "random":
        g = torch.Generator().manual_seed(derive_seed("eval-priors-random", seed))
        return FixedMixturePrior(data.init_rows(components, g), _uniform(components), log_var, memory_mb)
    if name == "kmeans":
        rows, log_w = kmeans_rows(model, train_x, components, seed, memory_mb)
        return FixedMixturePrior(rows, log_w, log_var, memory_mb)
    if name == "exemplar":
        return FixedMixturePrior(train_x.reshape(train_x.shape[0], -1), _uniform(train_x.shape[0]), log_var,
                                 memory_mb)
    raise ValueError(f"--priors: unknown prior {name!r} (choose from {', '.join(PRIORS)})")


def parse_priors(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ValueError("--priors: expected a comma-separated list, e.g. own,random,exemplar")
    bad = [p for p in names if p not in PRIORS]
    if bad:
        raise ValueError(f"--priors: unknown prior {bad[0]!r} (choose from {', '.join(PRIORS)})")
    return list(dict.fromkeys(names))


def gap_closed(nll: dict) -> Optional[float]:
    """(NLL_random - NLL_own) / (NLL_random - NLL_exemplar), when all three were measured."""
    if not all(k in nll for k in ("own", "random", "exemplar")) or nll["random"] == nll["exemplar"]:
        return None
    return (nll["random"] - nll["own"]) / (nll["random"] - nll["exemplar"])


class PriorTap(Prior):
    """Stands in for the model's prior during one call: returns `own`'s log p(z) and records, for every
    alternate prior, its log p(z) minus own's on the same z (float64)."""

    kind = "tap"

    def __init__(self, own: Prior, alternates: list[Prior]):
        super().__init__()
        self.own, self.alternates = own, nn.ModuleList(alternates)
        self.deltas: list[torch.Tensor] = []

    def log_prob(self, z, model, idx=None):
        base = self.own.log_prob(z, model, idx)
        self.deltas = [alt.log_prob(z, model).double() - base.double() for alt in self.alternates]
        return base


def log_weights_under(model, own: Prior, alternates: list[Prior]):
    """`log_weights(x, k, noise) -> [b, k, 1 + len(alternates)]`: the importance weights under `own` and
    each alternate prior, on the same samples z (one encoder and decoder pass for all of them)."""
    def log_weights(x: torch.Tensor, k: int, noise=None) -> torch.Tensor:
        tap = PriorTap(own, alternates)
        model.prior = tap
        try:
            lw = model.log_weights_is(x, k, noise).double()
        finally:
            model.prior = own
        return torch.stack([lw, *(lw + d.view_as(lw) for d in tap.deltas)], -1)
    return log_weights


def compare_priors(model, data, names: list[str], n_samples: int, *, components: int, seed: int,
                   max_rows: Optional[int] = None, limit: Optional[int] = None, ctx=None,
                   memory_mb: float = DEFAULT_MEMORY_MB,
                   log: Callable[[str], None] = print) -> dict:
    """Test NLL of the frozen model under each prior in `names`, all on the same importance samples."""
    test = data.test.head(limit)
    if len(test) == 0:
        raise ValueError("--limit: no test examples to evaluate")
    own = model.prior
    model.eval()
    t0 = time.time()
    priors = {name: build_eval_prior(name, own, model, data, components, seed, memory_mb) for name in names}
    for prior in priors.values():
        if isinstance(prior, FixedMixturePrior):
            prior.components(model)  # collective under torchrun: every rank encodes here, in step
    alternates = [p for name, p in priors.items() if name != "own"]
    log(f"eval --priors: {', '.join(names)} on {len(test)} test images, S = {n_samples}")
    ll, _ = importance_sampled_ll(model, test, n_samples, max_rows, None, TEST, ctx,
                                  log_weights=log_weights_under(model, own, alternates), memory_mb=memory_mb)
    column = {"own": 0, **{name: i + 1 for i, name in enumerate(n for n in names if n != "own")}}
    rows = {name: {"test_nll": float(-ll[:, column[name]].mean()), "components": priors[name].n_components}
            for name in names}
    nll = {k: v["test_nll"] for k, v in rows.items()}
    return {"prior_kind": own.kind, "is_samples": n_samples, "n_test": len(test), "components": components,
            "priors": rows, "gap_closed": gap_closed(nll), "seconds": round(time.time() - t0, 2)}


def format_table(result: dict) -> str:
    lines = [f"test NLL (nats; S = {result['is_samples']}, {result['n_test']} test images, the run's networks fixed)",
             f"{'prior':<10} {'components':>10} {'test NLL':>10}"]
    for name, row in result["priors"].items():
        lines.append(f"{name:<10} {row['components']:>10} {row['test_nll']:>10.3f}")
    if result["gap_closed"] is not None:
        lines.append(f"gap_closed = (random - own) / (random - exemplar) = {result['gap_closed']:.3f}")
    return "\n".join(lines)
