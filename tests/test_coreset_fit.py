"""bype.coreset.fit on its own: a linear-Gaussian model with a closed-form KL at two scales, the
diagnostics against known residuals, the constraints and the safeguard's rollback."""
import copy
import math

import pytest
import torch

import bype.coreset.optimizer as coreset_optimizer
from bype.coreset import Adam, FitOptions, fit, kl_gradients
from bype.coreset.estimate import diagnostics

F64 = torch.float64


class LinearGaussian:
    """x_n ~ N(z, t^2 I) in R^d with p0 = N(0, I): the posterior depends on the data only through N and
    sum(x), so a coreset with sum(w) = N and sum(w u) = sum(x) is exact, and KL(pi_Uw || pi_X) between
    the two Gaussian posteriors has a closed form."""

    def __init__(self, n: int, d: int, scale: float, t: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.d, self.t = n, d, t
        self.X = scale * (torch.randn(n, d, generator=g, dtype=F64) + 1.0)
        self.sum_x, self.sum_sq = self.X.sum(0), (self.X**2).sum()

    def posterior(self, total, weighted_sum):
        precision = 1 + total / self.t**2
        return weighted_sum / self.t**2 / precision, precision

    def kl(self, U, w) -> float:
        m1, p1 = self.posterior(w.sum(), (w[:, None] * U).sum(0))
        m2, p2 = self.posterior(self.n, self.sum_x)
        return float(0.5 * (self.d * p2 / p1 + p2 * ((m1 - m2) ** 2).sum() - self.d + self.d * math.log(p1 / p2)))

    def loglik(self, x, z):
        return -0.5 * ((x**2).sum(1)[:, None] - 2 * x @ z.T + (z**2).sum(1)[None, :]) / self.t**2

    def data_term(self, z):
        return -0.5 * (self.sum_sq - 2 * z @ self.sum_x + self.n * (z**2).sum(1)) / self.t**2

    def sample_z(self, U, w, n, generator):
        mean, precision = self.posterior(w.sum(), (w[:, None] * U).sum(0))
        return mean + torch.randn(n, self.d, generator=generator, dtype=F64) / math.sqrt(precision)

    def init(self, m: int, seed: int = 1):
        """m random data points with weights N/m (what ByPE starts from)."""
        pick = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[:m]
        return self.X[pick].clone(), torch.full((m,), self.n / m, dtype=F64)


# Two scales 100x apart in N, 100x apart in the data: the defaults must need no tuning for either.
PROBLEMS = {"small": dict(n=1000, d=3, scale=1.0, t=1.0), "large": dict(n=100_000, d=5, scale=10.0, t=3.0)}


def _fit(lg, U, w, adam=None, fused=None, **options):
    options = {"steps": 500, "samples": 32, "safeguard": False} | options
    return fit(lg.loglik, U, w, lg.sample_z, lg.data_term, n_data=lg.n, options=FitOptions(**options), adam=adam,
               fused=fused)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_fit_defaults_cut_the_closed_form_kl_to_one_percent(name):
    lg = LinearGaussian(**PROBLEMS[name])
    U, w = lg.init(20)
    start = lg.kl(U, w)
    _fit(lg, U, w)
    ratio = lg.kl(U, w) / start
    print(f"\n{name}: KL {start:.4g}; after 500 steps with the defaults {ratio:.2e} of it")
    assert ratio <= 0.01
    assert (w >= 0).all() and abs(float(w.sum()) - lg.n) < 1e-9 * lg.n  # sum(w) = N up to float64 rounding


def test_reference_schedule_cannot_move_large_weights():
    # N/M = 5000: a weight step of 0.5 / (j + 1) covers 3.4 in 500 steps, so half the KL is left.
    lg = LinearGaussian(**PROBLEMS["large"])
    U, w = lg.init(20)
    start = lg.kl(U, w)
    _fit(lg, U, w, schedule="reference")
    ratio = lg.kl(U, w) / start
    print(f"\nlarge: KL {start:.4g}; after 500 steps with the reference schedule {ratio:.2e} of it")
    assert ratio > 0.1


def test_half_var_is_the_kl_when_the_residual_is_gaussian():
    # With sum(w) = N the residual is linear in z, so R is Gaussian and KL = ½Var(R) exactly.
    lg = LinearGaussian(**PROBLEMS["small"])
    U, w = lg.init(20)
    out = _fit(lg, U, w, steps=0, samples=4000)
    # Var of a sample variance from S Gaussian draws: 2 sigma^4 / (S - 1): 2.2% relative here; 5 sigma.
    assert out["heldout_half_var_before"] == pytest.approx(lg.kl(U, w), rel=0.11)


def test_diagnostics_of_known_residuals():
    flat = diagnostics(torch.full((100,), 7.0, dtype=F64))
    assert flat == {"half_var": 0.0, "ess": pytest.approx(100.0), "logmeanexp": pytest.approx(0.0, abs=1e-12)}
    # One sample 1000 nats above the others: e^R carries all the weight on it, the log-mean-exp is
    # max - mean - log S (it measures the spread, not the KL), ½Var is 1000^2 / (2 S).
    R = torch.zeros(100, dtype=F64)
    R[3] = 1000.0
    spike = diagnostics(R)
    assert spike["ess"] == pytest.approx(1.0)
    assert spike["logmeanexp"] == pytest.approx(1000.0 - 10.0 - math.log(100), rel=1e-12)
    assert spike["half_var"] == pytest.approx(0.5 * float(R.var()), rel=1e-12)


def test_fit_keeps_the_weights_and_the_domain():
    lg = LinearGaussian(**PROBLEMS["small"])
    U, w = lg.init(10)
    assert U.min() < 0.0 and U.max() > 1.5  # data points outside the box: the projection must act
    _fit(lg, U, w, steps=20, domain=(0.0, 1.5))
    assert (w >= 0).all() and abs(float(w.sum()) - lg.n) < 1e-9 * lg.n
    assert U.min() >= 0.0 and U.max() <= 1.5


def test_reported_changes_match_the_tensors():
    lg = LinearGaussian(**PROBLEMS["small"])
    U, w = lg.init(10)
    U0, w0 = U.clone(), w.clone()
    out = _fit(lg, U, w, steps=20)
    assert out["u_mean_abs_change"] == pytest.approx(float((U - U0).abs().mean()))
    assert out["w_rel_change"] == pytest.approx(float((w - w0).abs().sum() / w0.sum()))
    assert out["w_min"] == float(w.min()) and out["w_max"] == float(w.max()) and len(out["trace"]) == 20


def test_safeguard_rolls_back_an_update_that_makes_the_objective_worse():
    lg = LinearGaussian(**PROBLEMS["small"])
    U, w = lg.init(10)
    adam = Adam({"U": U.shape, "w": w.shape}, U.device, F64)
    _fit(lg, U, w, steps=5, adam=adam)  # Adam moments that are not zero
    U1, w1, moments = U.clone(), w.clone(), copy.deepcopy(adam.state_dict())

    def ascent(U_, w_, z, g):  # the gradients with the wrong sign: every step raises the KL
        grad_U, grad_w = kl_gradients(lg.loglik, U_, w_, z, lg.data_term(z))
        R = lg.data_term(z) - w_ @ lg.loglik(U_, z)
        return -grad_U, -grad_w, R - R.mean()

    out = _fit(lg, U, w, steps=20, adam=adam, safeguard=True, fused=ascent)
    assert out["rolled_back"] == 1.0
    assert out["heldout_half_var_after"] > out["heldout_half_var_before"]
    assert torch.equal(U, U1) and torch.equal(w, w1)
    assert adam.t == moments["t"] and all(torch.equal(adam.m[k], moments["m"][k]) and
                                          torch.equal(adam.v[k], moments["v"][k]) for k in ("U", "w"))
    assert out["u_mean_abs_change"] == 0 and out["w_rel_change"] == 0
    # Without the safeguard the same update stays.
    kept = _fit(lg, U, w, steps=20, adam=adam, safeguard=False, fused=ascent)
    assert kept["rolled_back"] == 0.0 and not torch.equal(U, U1)


def test_fit_names_bad_arguments():
    lg = LinearGaussian(**PROBLEMS["small"])
    U, w = lg.init(5)
    with pytest.raises(ValueError, match="coreset.schedule: 'adagrad' is not one of scaled, reference"):
        _fit(lg, U, w, schedule="adagrad")
    with pytest.raises(ValueError, match=r"loglik\(U, z\): expected \[M, S\]=\[5, 64\], got \[64, 5\]"):
        fit(lambda x, z: lg.loglik(x, z).T, U, w, lg.sample_z, lg.data_term, n_data=lg.n,
            options=FitOptions(steps=1, samples=64))


def test_optimizer_counts_rollbacks_and_shrinks_its_steps(tmp_path, monkeypatch):
    from test_coreset import make_optimizer

    opt, model = make_optimizer(tmp_path)
    real = coreset_optimizer.likelihood_gradients

    def ascent(*args, **kwargs):
        grad_U, grad_w, R_c = real(*args, **kwargs)
        return -grad_U, -grad_w, R_c

    monkeypatch.setattr(coreset_optimizer, "likelihood_gradients", ascent)
    U0, w0 = model.prior.U.clone(), model.prior.w.clone()
    out = opt.update(1)
    assert out["rolled_back"] == 1.0 and out["rollbacks"] == 1.0 and opt.rollbacks == 1
    assert torch.equal(model.prior.U, U0) and torch.equal(model.prior.w, w0) and opt.adam.t == 0
    assert out["step_scale"] == 1.0 and opt.step_scale == pytest.approx(coreset_optimizer.STEP_SHRINK)
    assert opt.state_dict()["rollbacks"] == 1
