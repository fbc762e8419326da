"""What each pseudocoreset objective can see: the paper's degenerates for likelihoods linear in x; the
exemplar objective fits the coreset mixture to the Exemplar prior (docs/CORESET.md)."""
import json
import math
import os

import pytest
import torch

from bype.config import load_config
from bype.coreset import likelihood_gradients
from bype.coreset.exemplar import all_means, cross_entropy, fit_exemplar
from bype.models.likelihoods import Bernoulli, DiscretizedLogistic, Gaussian
from bype.seeds import derive_seed
from bype.train.loop import train
from tests.helpers import TINY

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


# --- the paper's objective: only the weighted mean for linear likelihoods ------------------------------
def _params(lik, S, D, g):
    if lik.name == "bernoulli":
        return 3 * torch.randn(S, 1, D, generator=g, dtype=F64)
    if lik.name == "gaussian":
        return torch.rand(S, 1, D, generator=g, dtype=F64)
    return torch.stack([torch.rand(S, D, generator=g, dtype=F64), -3 * torch.rand(S, D, generator=g, dtype=F64)], 1)


def _problem(lik, N=60, M=7, S=40, D=23, seed=0):
    """Data X [N, D], a coreset (U, w) with sum w = N, decoder outputs [S, P, D] and the exact data term."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(N, D, generator=g, dtype=F64) * 255).round() / 255
    U = (torch.rand(M, D, generator=g, dtype=F64) * 255).round() / 255 + 0.3 / 255  # off the bin centres
    w = torch.rand(M, generator=g, dtype=F64) + 0.5
    w *= N / w.sum()
    params = _params(lik, S, D, g)
    terms = lik.pairwise_log_prob(X, params)  # [N, S]
    return X, U, w, params, terms


def _matched_mean(X, U, w):
    """The same coreset shifted by one vector so that sum_m w_m u_m = sum_n x_n (sum w = N stays)."""
    return U + (X.sum(0) - w @ U) / w.sum()


def _abs_pixel_sums(lik, rows, params):
    """[n, S]: sum over pixels of |log p(x_d | z_s)|, the magnitudes a pairwise log-probability adds up."""
    return sum(lik.pairwise_log_prob(rows[:, d:d + 1], params[..., d:d + 1]).abs() for d in range(rows.shape[1]))


def _rounding_bound(lik, X, U, w, params):
    """What float64 rounding can leave of R(z_s) = sum_n f(x_n, z_s) - sum_m w_m f(u_m, z_s) when it cancels
    exactly: eps64 x the number of summed pixel terms x the sum of their magnitudes (the worst case of
    recursive summation), the largest over the samples."""
    n_terms = (X.shape[0] + U.shape[0]) * X.shape[1]
    magnitude = _abs_pixel_sums(lik, X, params).sum(0) + w @ _abs_pixel_sums(lik, U, params)
    return EPS64 * n_terms * magnitude.max().item()


@pytest.mark.parametrize("lik", [Bernoulli(), Gaussian(0.2)], ids=["bernoulli", "gaussian"])
def test_linear_likelihood_sees_only_the_weighted_mean(lik):
    X, U, w, params, terms = _problem(lik)
    data_term = terms.sum(0)
    Um = _matched_mean(X, U, w)
    _, grad_w, R = likelihood_gradients(lik, Um, w, params, data_term, path="closed_form")
    bound = _rounding_bound(lik, X, Um, w, params)
    # R(z) = (sum x - sum w u) . l(z) + const: with the means matched only rounding is left of it (centred,
    # each entry within 2 x bound).
    assert R.abs().max().item() < 2 * bound
    # grad_w = -Cov[A, R]: at most max|A - mean A| x max|R~| x S / (S - 1).
    A = lik.pairwise_log_prob(Um, params)
    spread = (A - A.mean(1, keepdim=True)).abs().max().item()
    assert grad_w.abs().max().item() < 2 * bound * spread * 2
    # The unmatched coreset has a residual many orders above rounding: the check can fail.
    _, _, R0 = likelihood_gradients(lik, U, w, params, data_term, path="closed_form")
    assert R0.std().item() > 1e6 * bound


@pytest.mark.parametrize("lik", [Bernoulli(), Gaussian(0.2)], ids=["bernoulli", "gaussian"])
def test_linear_likelihood_moves_every_point_by_one_vector(lik):
    X, U, w, params, terms = _problem(lik)
    grad_U, _, R = likelihood_gradients(lik, U, w, params, terms.sum(0), path="closed_form")
    s = torch.linalg.svdvals(grad_U)
    # grad_u f(u, z) = l(z) (Bernoulli) or (m(z) - u) / sigma^2 (Gaussian), so grad_U = w (x) v + w u (sum_s R~_s)
    # / sigma^2: rank one but for sum_s R~_s, which centring leaves at rounding, S eps64 max|R| at most.
    # Relative to the rank-one part (|R~| |v|) that is S eps64 times the ratio of the magnitudes involved.
    S = params.shape[0]
    rel = S * EPS64 * (1 + U.abs().max().item() * U.shape[1] / (params.abs().max().item() + 1e-300)) * 16
    assert s[0] > 0 and s[1] / s[0] < rel


def test_logistic_likelihood_is_not_degenerate():
    lik = DiscretizedLogistic()
    X, U, w, params, terms = _problem(lik)
    data_term = terms.sum(0)
    Um = _matched_mean(X, U, w).clamp(0, 1)
    grad_U, _, R = likelihood_gradients(lik, Um, w, params, data_term, path="autograd")
    assert R.std().item() > 1e6 * _rounding_bound(lik, X, Um, w, params)  # a real residual is left
    s = torch.linalg.svdvals(grad_U)
    assert s[1] / s[0] > 1e-3  # the points move by different vectors


# --- the exemplar objective ---------------------------------------------------------------------------
class LinearEncoder:
    """mu(x) = tanh(x W): a smooth, non-linear toy encoder in float64."""

    def __init__(self, D=12, d=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, d, generator=g, dtype=F64)

    def __call__(self, x):
        return torch.tanh(x @ self.W)


def _exemplar_case(N=300, M=12, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = LinearEncoder(D)
    X = torch.rand(N, D, generator=g, dtype=F64)
    U = X[torch.randperm(N, generator=g)[:M]].clone()
    w = torch.full((M,), N / M, dtype=F64)
    return enc, X, U, w, torch.tensor(math.log(0.05), dtype=F64)


def _seed_of(step):
    return derive_seed("test-exemplar", step)


def test_exemplar_objective_lowers_the_held_out_cross_entropy():
    enc, X, U, w, log_var = _exemplar_case()
    means = enc(X)
    out = fit_exemplar(enc, U, w, means, log_var, n_data=len(X), steps=60, draws=256, seed_of=_seed_of)
    assert not out["rolled_back"]
    assert out["heldout_ce_after"] < out["heldout_ce_before"] - 0.05
    assert 0 <= out["heldout_ce_gap_after"] < out["heldout_ce_gap_before"]
    # The parametrisation keeps the constraints: U in [0, 1], w >= 0 with sum N.
    assert U.min() >= 0 and U.max() <= 1 and (w > 0).all()
    assert abs(w.sum().item() - len(X)) < EPS64 * len(X) * len(w) * 8
    assert out["u_mean_abs_change"] > 0 and out["w_rel_change"] > 0
    assert len(out["trace"]) == 60


def test_the_exemplar_prior_itself_has_no_gap():
    # M = N, U = X, equal weights: the coreset mixture is the Exemplar prior, term by term.
    enc, X, _, _, log_var = _exemplar_case(N=40)
    U, w = X.clone(), torch.ones(len(X), dtype=F64)
    out = fit_exemplar(enc, U, w, enc(X), log_var, n_data=len(X), steps=0, draws=128, seed_of=_seed_of)
    # Both cross-entropies sum the same N terms per draw: they differ by rounding of the log-sum-exp.
    assert abs(out["heldout_ce_gap_before"]) < EPS64 * 128 * len(X) * abs(out["heldout_ce_exemplar"])


def test_an_update_that_makes_things_worse_is_rolled_back():
    enc, X, U, w, log_var = _exemplar_case()
    U0, w0 = U.clone(), w.clone()
    # Steps of 50 in logit space on one draw each: every weight but a few goes to 0 and the pixels to 0 or 1.
    out = fit_exemplar(enc, U, w, enc(X), log_var, n_data=len(X), steps=5, draws=1, seed_of=_seed_of,
                       lr_u=50.0, lr_w=50.0)
    assert out["rolled_back"] and out["heldout_ce_after"] > out["heldout_ce_before"]
    assert torch.equal(U, U0) and torch.equal(w, w0)


def test_cross_entropy_matches_a_float64_reference():
    g = torch.Generator().manual_seed(3)
    z, mu = torch.randn(37, 4, generator=g, dtype=F64), torch.randn(11, 4, generator=g, dtype=F64)
    log_w, log_var = torch.log_softmax(torch.randn(11, generator=g, dtype=F64), 0), torch.tensor(-0.3, dtype=F64)
    d2 = ((z[:, None] - mu[None]) ** 2).sum(-1)
    ref = -(torch.logsumexp(log_w - 0.5 * d2 / log_var.exp(), 1) - 2 * (math.log(2 * math.pi) + log_var)).mean()
    assert abs(cross_entropy(z, mu, log_w, log_var, chunk=5) - ref.item()) < EPS64 * 64 * abs(ref.item()) * 11


def _ddp_exemplar(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    enc, X, U, w, log_var = _exemplar_case()
    means = all_means(enc, lambda lo, hi: X[lo:hi], len(X), chunk=64)  # each rank encodes its block
    out = fit_exemplar(enc, U, w, means, log_var, n_data=len(X), steps=20, draws=101, seed_of=_seed_of)
    torch.save({"U": U, "w": w, "means": means, "ce": out["heldout_ce_after"]}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_fit_the_same_coreset_as_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_exemplar, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert torch.equal(r0["U"], r1["U"]) and torch.equal(r0["w"], r1["w"])  # one all-reduce: identical
    enc, X, U, w, log_var = _exemplar_case()
    assert torch.equal(r0["means"], enc(X))  # the gathered blocks are the rows themselves
    fit_exemplar(enc, U, w, enc(X), log_var, n_data=len(X), steps=20, draws=101, seed_of=_seed_of)
    # Gradient shares summed in another order differ by ~draws x eps64 relatively; 20 Adam steps of at most
    # lr each carry that into U far below this bound, which is still 1e-7 of the domain.
    torch.testing.assert_close(r0["U"], U, rtol=0, atol=1e-7)
    torch.testing.assert_close(r0["w"], w, rtol=1e-7, atol=0)


def test_training_with_the_exemplar_objective_logs_its_diagnostics(tmp_path, fmnist_root):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=ex", *TINY, "train.epochs=4", "coreset.objective=exemplar",
                             "coreset.steps=30", "coreset.samples=64", "eval.n_samples_grid=4"])
    train(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        updates = [r for r in map(json.loads, f) if "coreset_heldout_ce_before" in r]
    assert [r["epoch"] for r in updates] == [2, 4]
    for r in updates:
        assert r["coreset_heldout_ce_gap_before"] > 0  # M = 20 images cannot be the 1000-image prior
        if not r["coreset_rolled_back"]:
            assert r["coreset_heldout_ce_after"] < r["coreset_heldout_ce_before"]
            assert r["coreset_u_mean_abs_change"] > 0
        assert r["coreset_mean_gap_before"] > 0 and r["coreset_mean_gap_after"] > 0
    assert any(not r["coreset_rolled_back"] for r in updates)


def test_posterior_updates_log_the_weighted_mean_gap(tmp_path, fmnist_root):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=post", *TINY, "train.epochs=2", "eval.n_samples_grid=4"])
    train(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        (update,) = [r for r in map(json.loads, f) if "coreset_heldout_half_var_before" in r]
    # The paper's update corrects the weighted mean: the gap it leaves is smaller than the one it found.
    assert 0 < update["coreset_mean_gap_after"] < update["coreset_mean_gap_before"] or update["coreset_rolled_back"]


def test_unknown_objective_is_one_line():
    from bype.config import ConfigError

    with pytest.raises(ConfigError, match=r"^coreset.objective: 'kl' is not one of posterior, exemplar$"):
        load_config(None, ["coreset.objective=kl"])
