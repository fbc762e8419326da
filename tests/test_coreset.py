"""The pseudocoreset optimiser: gradients against a closed form, data terms, constraints, training."""
import copy
import json
import math
import os

import pytest
import torch

import bype.coreset.gradients as coreset_gradients
import bype.coreset.optimizer as coreset_optimizer
from bype.train import checkpoint
from bype.config import load_config
from bype.coreset import (Adam, PseudocoresetOptimizer, kl_estimate, kl_gradients, likelihood_gradients,
                          project_weights)
from bype.coreset.data_term import ExactDataTerm, MinibatchDataTerm, stream_stats
from bype.data import load_data, split_stats
from bype.data.memory import load_idx_dataset
from bype.models import build_model
from bype.models.likelihoods import Bernoulli, DiscretizedLogistic, Gaussian
from bype.train.loop import train

F64 = torch.float64


# --- a linear-Gaussian model: log p(x|z) = log N(x; W z + b, t^2 I), p0 = N(0, I) ---------------------
class LinearGaussian:
    """Every posterior is Gaussian: precision I + (sum of weights) W^T W / t^2, so KL(pi_Uw || pi_X) has
    a closed form to differentiate and pi_Uw can be sampled exactly."""

    def __init__(self, D=3, d=2, t=0.7, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.D, self.d, self.t = D, d, t
        self.W = torch.randn(D, d, generator=g, dtype=F64)
        self.b = 0.3 * torch.randn(D, generator=g, dtype=F64)
        self.X = torch.randn(n, d, generator=g, dtype=F64) @ self.W.T + self.b + t * torch.randn(n, D, generator=g, dtype=F64)

    def posterior(self, U, w):
        P = torch.eye(self.d, dtype=F64) + w.sum() * self.W.T @ self.W / self.t**2
        mu = torch.linalg.solve(P, self.W.T @ (w[:, None] * (U - self.b)).sum(0) / self.t**2)
        return mu, P

    def kl(self, U, w):
        mu_u, P_u = self.posterior(U, w)
        mu_x, P_x = self.posterior(self.X, torch.ones(len(self.X), dtype=F64))
        diff = mu_x - mu_u
        return 0.5 * (torch.trace(P_x @ torch.linalg.inv(P_u)) + diff @ P_x @ diff - self.d
                      + torch.logdet(P_u) - torch.logdet(P_x))

    def loglik(self, x, z):
        m = z @ self.W.T + self.b
        sq = (x**2).sum(1)[:, None] - 2 * x @ m.T + (m**2).sum(1)[None, :]
        return -0.5 * sq / self.t**2 - self.D * (math.log(self.t) + 0.5 * math.log(2 * math.pi))

    def sample(self, U, w, n, generator):
        mu, P = self.posterior(U, w)
        chol = torch.linalg.cholesky(torch.linalg.inv(P))
        return mu + torch.randn(n, self.d, generator=generator, dtype=F64) @ chol.T

    def mc_gradients(self, U, w, n, generator):
        z = self.sample(U, w, n, generator)
        return kl_gradients(self.loglik, U, w, z, self.loglik(self.X, z).sum(0))


def test_kl_gradients_match_autograd_of_closed_form_kl():
    lg = LinearGaussian()
    g = torch.Generator().manual_seed(1)
    U = 2 * torch.randn(4, lg.D, generator=g, dtype=F64)
    w = 20 * torch.rand(4, generator=g, dtype=F64)
    Ur, wr = U.clone().requires_grad_(), w.clone().requires_grad_()
    exact_U, exact_w = torch.autograd.grad(lg.kl(Ur, wr), (Ur, wr))
    grad_U, grad_w = lg.mc_gradients(U, w, 200_000, g)
    err_U = ((grad_U - exact_U).norm() / exact_U.norm()).item()
    err_w = ((grad_w - exact_w).norm() / exact_w.norm()).item()
    print(f"\nlinear-Gaussian: KL {lg.kl(U, w).item():.4g}, relative error grad_U {err_U:.2e}, grad_w {err_w:.2e}")
    assert err_U < 0.02 and err_w < 0.02


# The log-mean-exp is biased low (Jensen) and the bias grows with the KL: 5% at KL~1, 10% at KL~15.
@pytest.mark.parametrize("spread, tol", [(0.2, 0.05), (0.8, 0.10)])
def test_kl_estimate_matches_closed_form_kl(spread, tol):
    lg = LinearGaussian()
    g = torch.Generator().manual_seed(2)
    U = lg.X.mean(0) + spread * torch.randn(4, lg.D, generator=g, dtype=F64)
    w = torch.full((4,), len(lg.X) / 4, dtype=F64)
    z = lg.sample(U, w, 200_000, g)
    R = lg.loglik(lg.X, z).sum(0) - w @ lg.loglik(U, z)
    exact, estimate = lg.kl(U, w).item(), kl_estimate(R)
    print(f"\nlinear-Gaussian KL {exact:.4f}, Monte Carlo estimate {estimate:.4f}")
    assert exact > 0.5 and abs(estimate - exact) < tol * exact


def test_adam_on_kl_gradients_drives_the_closed_form_kl_down():
    lg = LinearGaussian()
    n = len(lg.X)
    g = torch.Generator().manual_seed(3)
    U = 2 * torch.randn(4, lg.D, generator=g, dtype=F64)
    w = torch.full((4,), n / 4, dtype=F64)
    adam = Adam({"U": U.shape, "w": w.shape}, "cpu", F64)
    before = lg.kl(U, w).item()
    for _ in range(200):
        grad_U, grad_w = lg.mc_gradients(U, w, 2000, g)  # fresh exact samples of pi_Uw every step
        adam.step({"U": U, "w": w}, {"U": grad_U, "w": grad_w}, {"U": 0.1, "w": 0.1})
        project_weights(w, n)
    after = lg.kl(U, w).item()
    print(f"\nlinear-Gaussian closed-form KL: before {before:.4g}, after 200 Adam steps {after:.3g}")
    assert before > 10 and after < 1e-4 * before
    assert (w >= 0).all() and abs(w.sum().item() - n) < 1e-9


def test_kl_gradients_rejects_bad_shapes():
    lg = LinearGaussian()
    U, w, z = torch.zeros(4, 3, dtype=F64), torch.ones(4, dtype=F64), torch.zeros(10, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"w: expected \[M\]=\[4\], got shape \[3\]"):
        kl_gradients(lg.loglik, U, w[:3], z, torch.zeros(10, dtype=F64))
    with pytest.raises(ValueError, match=r"data_term: expected \[S\]=\[10\]"):
        kl_gradients(lg.loglik, U, w, z, torch.zeros(9, dtype=F64))


# --- closed-form, autograd and fused-kernel gradient paths agree ---------------------------------------
def _case(lik, seed=0, M=6, S=24, D=30):
    g = torch.Generator().manual_seed(seed)
    U = torch.rand(M, D, generator=g, dtype=F64)
    w = 5 * torch.rand(M, generator=g, dtype=F64)
    if lik.name == "bernoulli":
        params = 3 * torch.randn(S, 1, D, generator=g, dtype=F64)
    elif lik.name == "gaussian":
        params = torch.rand(S, 1, D, generator=g, dtype=F64)
    else:
        params = torch.stack([torch.rand(S, D, generator=g, dtype=F64),
                              -3 * torch.rand(S, D, generator=g, dtype=F64)], 1)
    x = torch.rand(50, D, generator=g, dtype=F64)
    if lik.name == "logistic":
        U, x = (U * 255).round() / 255 + 0.3 / 255, (x * 255).round() / 255  # U off the bin centres
    data_term = lik.pairwise_log_prob(x, params).sum(0)
    return U, w, params, data_term


@pytest.mark.parametrize("lik", [Bernoulli(), Gaussian(0.2)], ids=["bernoulli", "gaussian"])
def test_closed_form_gradients_equal_generic_autograd(lik):
    U, w, params, data_term = _case(lik)
    z = torch.zeros(params.shape[0], 1)  # params already encode z; the generic loglik ignores it
    ref_U, ref_w = kl_gradients(lambda x, _: lik.pairwise_log_prob(x, params), U, w, z, data_term)
    grad_U, grad_w, _ = likelihood_gradients(lik, U, w, params, data_term, path="closed_form")
    assert ref_U.abs().max() > 1e-3
    torch.testing.assert_close(grad_U, ref_U)
    torch.testing.assert_close(grad_w, ref_w)


def test_chunked_autograd_path_equals_generic_one(monkeypatch):
    lik = DiscretizedLogistic()
    U, w, params, data_term = _case(lik)
    z = torch.zeros(params.shape[0], 1)
    ref_U, ref_w = kl_gradients(lambda x, _: lik.pairwise_log_prob(x, params), U, w, z, data_term)
    monkeypatch.setattr(coreset_gradients, "AUTOGRAD_CHUNK", 2 * params.shape[0] * U.shape[1])  # 2 rows per chunk
    grad_U, grad_w, _ = likelihood_gradients(lik, U, w, params, data_term, path="autograd")
    assert ref_U.abs().max() > 1e-3
    torch.testing.assert_close(grad_U, ref_U)
    torch.testing.assert_close(grad_w, ref_w)


@pytest.mark.parametrize("lik", [Bernoulli(), DiscretizedLogistic()], ids=["bernoulli", "logistic"])
def test_fused_kernel_equals_kl_gradients(lik):
    import kernels

    if not hasattr(kernels, "coreset_grads"):
        pytest.skip("kernels.coreset_grads is not available in this tree")
    U, w, params, data_term = _case(lik, M=40, S=64, D=96)
    U, w, params, data_term = U.float(), w.float(), params.float(), data_term.float()
    z = torch.zeros(params.shape[0], 1)
    ref_U, ref_w = kl_gradients(lambda x, _: lik.pairwise_log_prob(x.double(), params.double()),
                                U.double(), w.double(), z, data_term.double())
    grad_U, grad_w, _ = likelihood_gradients(lik, U, w, params, data_term, path="kernel")
    torch.testing.assert_close(grad_U.double(), ref_U, rtol=2e-3, atol=2e-3 * ref_U.abs().max().item())
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=2e-3, atol=2e-3 * ref_w.abs().max().item())


# --- data terms ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist_train(fmnist_root):
    train, _, _ = load_idx_dataset("fashion-mnist", fmnist_root)
    return train.head(3000)


def test_exact_bernoulli_data_term_equals_brute_force_sum(fmnist_train):
    x = fmnist_train.floats().double()
    logits = 4 * torch.randn(9, 1, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=F64)
    stats = stream_stats(fmnist_train.x, chunk=700)
    ref = split_stats(fmnist_train)
    torch.testing.assert_close(stats["sum_x"], ref["sum_x"])
    torch.testing.assert_close(stats["sum_sq"], torch.as_tensor(ref["sum_sq"], dtype=F64))
    exact = ExactDataTerm(Bernoulli(), stats, x.shape[1], torch.device("cpu"))(logits)
    brute = torch.stack([Bernoulli().log_prob(x, logits[s:s + 1].expand(len(x), -1, -1)).sum() for s in range(9)])
    torch.testing.assert_close(exact, brute, rtol=1e-8, atol=0.0)


def test_exact_gaussian_data_term_equals_brute_force_sum(fmnist_train):
    x = fmnist_train.floats().double()
    lik = Gaussian(0.1)
    means = torch.rand(5, 1, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = ExactDataTerm(lik, split_stats(fmnist_train), x.shape[1], torch.device("cpu"))(means)
    brute = torch.stack([lik.log_prob(x, means[s:s + 1].expand(len(x), -1, -1)).sum() for s in range(5)])
    torch.testing.assert_close(exact, brute, rtol=1e-10, atol=1e-4)


def _rows(split):
    return lambda idx: split.x[idx].reshape(len(idx), -1).float() / 255.0


def test_minibatch_data_term_is_unbiased_for_the_binarised_data(fmnist_train):
    lik, n = Bernoulli(), len(fmnist_train)
    logits = 2 * torch.randn(4, 1, 784, generator=torch.Generator().manual_seed(2))
    exact = ExactDataTerm(lik, split_stats(fmnist_train), 784, torch.device("cpu"))(logits)
    term = MinibatchDataTerm(lik, _rows(fmnist_train), n, batch_size=100)
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([term(logits, g) for _ in range(400)])
    stderr = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 4 * stderr).all(), ((draws.mean(0) - exact) / stderr)


def test_minibatch_rank_shares_add_up_to_the_single_process_estimate(fmnist_train):
    lik, n = Bernoulli(), len(fmnist_train)
    logits = torch.randn(5, 1, 784, generator=torch.Generator().manual_seed(4))
    whole = MinibatchDataTerm(lik, _rows(fmnist_train), n, 101)(logits, torch.Generator().manual_seed(9))
    # Without a process group all_reduce_sum is the identity, so each rank returns its own share.
    shares = [MinibatchDataTerm(lik, _rows(fmnist_train), n, 101, rank=r, world_size=3)(
        logits, torch.Generator().manual_seed(9)) for r in range(3)]
    # Each row's log-likelihood is a float32 sum over 784 pixels whose order depends on the BLAS path
    # (rows of 101 vs 34): allow 784 float32 roundings, relative to the total (rows are summed in float64).
    torch.testing.assert_close(sum(shares), whole, rtol=784 * torch.finfo(torch.float32).eps, atol=0.0)


# --- the optimiser on a real (small) VAE --------------------------------------------------------------
def make_optimizer(tmp_path, *overrides):
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.train_limit=600", "data.eval_limit=100",
                             "model.hidden=48", "model.latent_dim=6", "prior.components=12", "coreset.steps=6",
                             "coreset.samples=16", "coreset.every=1", *overrides])
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.input_shape)
    model.prior.init_from_data(data.init_rows(model.prior.n_components, torch.Generator().manual_seed(0)),
                               data.n_train)
    return PseudocoresetOptimizer.from_config(cfg, model, data), model


def assert_invariants(model, n_data):
    U, w = model.prior.U, model.prior.w
    assert torch.isfinite(w).all() and (w >= 0).all(), w
    assert abs(w.double().sum().item() - n_data) < 1e-4 * n_data
    assert torch.isfinite(U).all() and U.min() >= 0 and U.max() <= 1


@pytest.mark.parametrize("overrides", [
    ("model.likelihood=bernoulli", "coreset.data_term=exact"),
    ("model.likelihood=bernoulli", "coreset.data_term=minibatch"),
    ("model.likelihood=gaussian",),
    ("model.likelihood=logistic",),
    ("model.arch=hvae",),
], ids=["bernoulli-exact", "bernoulli-minibatch", "gaussian", "logistic", "hvae"])
def test_constraints_hold_after_every_update(tmp_path, overrides):
    opt, model = make_optimizer(tmp_path, *overrides)
    U0, w0 = model.prior.U.clone(), model.prior.w.clone()
    model.train()
    for epoch in (1, 2, 3):
        out = opt.update(epoch)
        assert_invariants(model, 600)
        assert model.training  # the VAE's mode is restored
        assert out["steps"] == 6 and out["skipped_steps"] == 0
    assert not torch.equal(model.prior.U, U0) and not torch.equal(model.prior.w, w0)
    expected = 0.0 if "logistic" in overrides[0] or "minibatch" in overrides[-1] else 1.0
    assert out["data_term_exact"] == expected
    import kernels

    paths = {"bernoulli": "kernel", "logistic": "kernel", "gaussian": "closed_form"}  # the fused kernel first
    if not hasattr(kernels, "coreset_grads"):
        paths.update(bernoulli="closed_form", logistic="autograd")
    assert opt.grad_path == paths[model.likelihood.name]
    assert all(p.grad is None for p in model.parameters())  # nothing touched the VAE's gradients


def test_weights_pushed_negative_are_clamped_not_renormalised(tmp_path, monkeypatch):
    opt, model = make_optimizer(tmp_path, "coreset.schedule=reference", "coreset.lr=1000",  # a first step of 1000 on w
                                "coreset.safeguard=false")  # keep the update: its projection is under test
    real = coreset_optimizer.likelihood_gradients

    def adversarial(*args, **kwargs):  # push the first half of the weights far below zero
        grad_U, grad_w, R_c = real(*args, **kwargs)
        return grad_U, torch.where(torch.arange(12) < 6, 1e6, -1e6).to(grad_w), R_c

    monkeypatch.setattr(coreset_optimizer, "likelihood_gradients", adversarial)
    opt.steps = 1
    out = opt.update(1)
    assert_invariants(model, 600)
    assert out["active"] == 6 and out["weight_resets"] == 0
    torch.testing.assert_close(model.prior.w, torch.tensor([0.0] * 6 + [100.0] * 6))  # clamped, then rescaled


def test_all_weights_at_zero_reset_to_uniform(tmp_path):
    opt, model = make_optimizer(tmp_path, "coreset.schedule=reference", "coreset.lr=10000",  # first step -1e4 on w
                                "coreset.safeguard=false")
    out = opt.update(1)
    assert out["weight_resets"] == 6
    assert_invariants(model, 600)
    torch.testing.assert_close(model.prior.w, torch.full((12,), 50.0))


def test_project_weights_clamps_rescales_and_resets():
    w = torch.tensor([3.0, -1.0, float("nan"), 1.0])
    assert not project_weights(w, 100.0)
    torch.testing.assert_close(w, torch.tensor([75.0, 0.0, 0.0, 25.0]))
    w = torch.tensor([-3.0, -1.0, 0.0, -1e-9])
    assert project_weights(w, 100.0)
    torch.testing.assert_close(w, torch.full((4,), 25.0))


def test_non_finite_gradients_skip_the_step(tmp_path):
    opt, model = make_optimizer(tmp_path)
    U0, w0 = model.prior.U.clone(), model.prior.w.clone()
    opt.data_term = lambda params, g: torch.full((params.shape[0],), float("nan"), dtype=F64)
    out = opt.update(1)
    assert out["skipped_steps"] == 6
    assert torch.equal(model.prior.U, U0) and torch.equal(model.prior.w, w0)


def test_exact_data_term_refused_for_logistic(tmp_path):
    with pytest.raises(ValueError, match="coreset.data_term: exact needs sufficient statistics"):
        make_optimizer(tmp_path, "model.likelihood=logistic", "coreset.data_term=exact")


def test_due_follows_coreset_every(tmp_path):
    opt, _ = make_optimizer(tmp_path, "coreset.every=3")
    assert [e for e in range(1, 10) if opt.due(e)] == [3, 6, 9]


def test_state_round_trip_reproduces_the_next_update(tmp_path):
    opt, model = make_optimizer(tmp_path)
    opt.update(1)
    saved = copy.deepcopy(opt.state_dict())
    U1, w1 = model.prior.U.clone(), model.prior.w.clone()
    ref = opt.update(2)
    U2, w2 = model.prior.U.clone(), model.prior.w.clone()

    fresh, model_b = make_optimizer(tmp_path)
    model_b.load_state_dict(model.state_dict())
    model_b.prior.U.copy_(U1)
    model_b.prior.w.copy_(w1)
    cold = fresh.update(2)  # without the saved Adam moments the update differs
    assert not torch.equal(model_b.prior.U, U2)

    model_b.prior.U.copy_(U1)
    model_b.prior.w.copy_(w1)
    fresh.load_state_dict(saved)
    got = fresh.update(2)
    assert torch.equal(model_b.prior.U, U2) and torch.equal(model_b.prior.w, w2)
    assert got["heldout_half_var_before"] == ref["heldout_half_var_before"]
    assert got["heldout_half_var_after"] == ref["heldout_half_var_after"] != cold["heldout_half_var_after"]
    assert [h["epoch"] for h in fresh.history] == [1, 2] and fresh.history[0] == opt.history[0]
    accepted = 2 - int(opt.history[0]["rolled_back"] + opt.history[1]["rolled_back"])  # a rollback restores Adam
    assert fresh.state_dict()["adam"]["t"] == opt.state_dict()["adam"]["t"] == 6 * accepted


def test_load_state_dict_names_the_bad_shape(tmp_path):
    opt, _ = make_optimizer(tmp_path)
    state = opt.state_dict()
    state["adam"]["m"]["U"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"adam m\['U'\] has shape \[3, 3\], expected \[12, 784\]"):
        opt.load_state_dict(state)


MODES = ("exact", "minibatch")


def _ddp_worker(rank, world, init_file, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for mode in MODES:
        opt, model = make_optimizer(tmp_path, f"coreset.data_term={mode}", "coreset.safeguard=false")
        out = opt.update(1)
        torch.save({"U": model.prior.U, "w": model.prior.w, "kl": out["heldout_half_var_after"]}, tmp_path / f"{mode}{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_compute_the_identical_update(tmp_path, fmnist_root):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    for mode in MODES:
        r0, r1 = (torch.load(tmp_path / f"{mode}{r}.pt") for r in (0, 1))
        assert torch.equal(r0["U"], r1["U"]) and torch.equal(r0["w"], r1["w"]) and r0["kl"] == r1["kl"], mode
        single_opt, single = make_optimizer(tmp_path, f"coreset.data_term={mode}", "coreset.safeguard=false")  # one process
        U0 = single.prior.U.clone()
        single_opt.update(1)
        assert not torch.equal(r0["U"], U0)
        # Minibatch: the same terms summed per rank then all-reduced (another order); threads differ too.
        assert (r0["U"] - single.prior.U).abs().mean() < 1e-3, mode
        torch.testing.assert_close(r0["w"], single.prior.w, rtol=1e-3, atol=1e-3)


def test_training_run_updates_the_coreset_and_lowers_the_kl(tmp_path, fmnist_root):
    # The default step sizes (coreset.schedule=scaled) and the safeguard.
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=bype", "data.train_limit=2000", "data.eval_limit=500",
                             "prior.components=50", "coreset.every=2", "train.epochs=4", "coreset.steps=20",
                             "eval.at_end=false", "eval.n_samples_grid=4"])
    train(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    updated = [r for r in records if "coreset_heldout_half_var_before" in r]
    assert [r["epoch"] for r in updated] == [2, 4]
    for r in updated:
        print(f"\nepoch {r['epoch']}: held-out ½Var(R) {r['coreset_heldout_half_var_before']:.4g} -> "
              f"{r['coreset_heldout_half_var_after']:.4g}, rolled back {r['coreset_rolled_back']:.0f}")
        assert r["coreset_steps"] == 20 and r["coreset_data_term_exact"] == 1.0
        # Accepted updates lower the held-out objective; a rolled-back one leaves U unchanged.
        if r["coreset_rolled_back"]:
            assert r["coreset_u_mean_abs_change"] == 0 and r["coreset_w_rel_change"] == 0
        else:
            assert r["coreset_heldout_half_var_after"] < r["coreset_heldout_half_var_before"]
            assert r["coreset_u_mean_abs_change"] > 0 and r["coreset_w_rel_change"] > 0
    accepted = sum(not r["coreset_rolled_back"] for r in updated)
    assert accepted >= 1
    last = checkpoint.load(os.path.join(cfg.run_dir, "last.pt"))
    assert [h["epoch"] for h in last["coreset"]["history"]] == [2, 4] and last["coreset"]["adam"]["t"] == 20 * accepted
    w = last["model"]["prior.w"]
    assert (w >= 0).all() and abs(w.double().sum().item() - 2000) < 0.1


def test_bench_coreset_writes_a_row_per_size_and_mode(tmp_path, fmnist_root, capsys):
    from bype.cli import build_parser

    args = build_parser().parse_args(["bench", "coreset", "--n", "3000,7000", "--m", "20", "--s", "16", "--steps", "2",
                                      "--hidden", "32", "--latent", "4", "--out", str(tmp_path)])
    assert args.func(args) == 0
    with open(tmp_path / "coreset.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["n"], r["mode"]) for r in rows] == [(3000, "exact"), (3000, "minibatch"), (7000, "exact"), (7000, "minibatch")]
    assert all(r["step_ms"] > 0 and r["update_s"] > 0 for r in rows)
    assert rows[0]["stats_s"] is not None and rows[1]["stats_s"] is None
    assert "| 7,000 | minibatch" in capsys.readouterr().out
