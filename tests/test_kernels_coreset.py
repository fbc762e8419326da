"""kernels.coreset_grads (fused) against the literal, unfused Monte Carlo estimator in float64."""
import importlib
import os

# Triton picks compile vs interpret when it is first imported: set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from tests.helpers import triton_skip_reason  # noqa: E402
# the package attribute `coreset_grads` is the function; the module is reached explicitly
cg = importlib.import_module("kernels.coreset_grads")
from kernels import coreset_reference as ref  # noqa: E402


TRITON_SKIP = triton_skip_reason(cg._triton_module)
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP))]
LIKELIHOODS = ["bernoulli", "logistic"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # several tiles and ragged edges in every dimension for M=13, S=29, D=37
    monkeypatch.setattr(cg, "CPU_BLOCKS", ((16, 16, 16), (16, 16, 16)))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


def make_problem(M, S, D, likelihood, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.rand(M, D, generator=g, dtype=torch.float64)
    # grey levels at and next to both edges exercise the three branches of the logistic pmf
    U[0, :4] = torch.tensor([0.0, 1.0, 1.0 / 255, 254.0 / 255])[:D]
    w = 100.0 * torch.rand(M, generator=g, dtype=torch.float64)
    if likelihood == "bernoulli":
        params = 2.0 * torch.randn(S, 1, D, generator=g, dtype=torch.float64)
    else:
        mean = torch.rand(S, D, generator=g, dtype=torch.float64)
        log_scale = 0.7 * torch.randn(S, D, generator=g, dtype=torch.float64) - 3.0
        params = torch.stack([mean, log_scale], 1)
    data_term = -5e4 + 30.0 * torch.randn(S, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (U, w, params, data_term)]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("shape", [(13, 29, 37), (1, 2, 1), (40, 17, 5)])
def test_fused_matches_unfused_estimator(impl, likelihood, shape):
    M, S, D = shape
    U, w, params, data_term = make_problem(M, S, D, likelihood, seed=sum(shape))
    gU, gw, r = kernels.coreset_grads(U, w, params, data_term, likelihood, impl=impl)
    gU_ref, gw_ref, r_ref = ref.coreset_grads_reference(U, w, params, data_term, likelihood)
    assert gU.shape == (M, D) and gw.shape == (M,) and r.shape == (S,)
    assert gU.dtype == U.dtype and gw.dtype == w.dtype
    # float64 torch path: same maths, different order -> ~1e-12; Triton computes in fp32
    tol = 1e-10 if (impl == "torch" or likelihood == "bernoulli") else 2e-5
    assert rel_err(gU, gU_ref) < tol
    assert rel_err(gw, gw_ref) < tol
    assert rel_err(r, r_ref) < tol
    assert abs(r.sum().item()) < 1e-6 * r.abs().max().item() * S  # centred


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_inputs(impl):
    U, w, params, data_term = make_problem(13, 29, 37, "logistic", seed=3)
    ref_out = ref.coreset_grads_reference(U, w, params, data_term, "logistic")
    out = kernels.coreset_grads(U.float(), w.float(), params.float(), data_term.float(), "logistic", impl=impl)
    assert out[0].dtype == torch.float32
    for a, b in zip(out, ref_out):
        assert rel_err(a, b) < 1e-4


def test_bernoulli_grad_U_is_rank_one():
    U, w, params, data_term = make_problem(13, 29, 37, "bernoulli", seed=4)
    gU, _, r = kernels.coreset_grads(U, w, params, data_term, "bernoulli")
    v = params[:, 0, :].T @ r  # sum_s l_s R~_s
    torch.testing.assert_close(gU, -w[:, None] * v[None, :] / (29 - 1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_coreset_equal_to_data_has_zero_gradient(impl, likelihood):
    """U = the data with unit weights makes pi_Uw = pi_X: residual and gradients vanish."""
    X, _, params, _ = make_problem(11, 23, 9, likelihood, seed=5)
    w = torch.ones(11, dtype=torch.float64)
    data_term = kernels.pairwise_log_prob(X, params, likelihood, impl="torch").sum(0)
    gU, gw, r = kernels.coreset_grads(X, w, params, data_term, likelihood, impl=impl)
    scale = data_term.abs().max().item()
    tol = 1e-12 if impl == "torch" else 1e-6
    assert r.abs().max() < tol * scale
    assert gw.abs().max() < tol * scale * 10
    assert gU.abs().max() < tol * scale * 100
    # and a perturbed weight gives a non-zero gradient (the test above can fail)
    w2 = w.clone()
    w2[0] = 2.0
    _, gw2, _ = kernels.coreset_grads(X, w2, params, data_term, likelihood, impl=impl)
    assert gw2.abs().max() > 1e3 * tol * scale


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_pairwise_log_prob(impl, likelihood):
    X, _, params, _ = make_problem(13, 29, 37, likelihood, seed=6)
    out = kernels.pairwise_log_prob(X, params, likelihood, impl=impl)
    full = ref.log_prob_elementwise(X[:, None, :], params[None], likelihood).sum(-1)
    assert out.shape == (13, 29)
    assert rel_err(out, full) < (1e-12 if impl == "torch" or likelihood == "bernoulli" else 1e-6)


@pytest.mark.parametrize("log_scale", [-8.0, -4.0, 0.0, 3.0])
def test_logistic_pmf_sums_to_one(log_scale):
    levels = torch.arange(256, dtype=torch.float64)[:, None] / 255
    mean = torch.tensor([[0.0, 0.3, 0.5, 0.999, 1.0]], dtype=torch.float64)
    lp = ref.logistic_log_pmf(levels, mean, torch.full_like(mean, log_scale))
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(0), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-9)


def test_logistic_derivative_matches_autograd():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(200, dtype=torch.float64, generator=g)
    x[:4] = torch.tensor([0.0, 1.0, 0.5 / 510, 1 - 0.5 / 510])
    mean = torch.rand(200, dtype=torch.float64, generator=g)
    ls = torch.randn(200, dtype=torch.float64, generator=g) - 2
    xg = x.clone().requires_grad_()
    (auto,) = torch.autograd.grad(ref.logistic_log_pmf(xg, mean, ls).sum(), xg)
    torch.testing.assert_close(ref.logistic_dlog_pmf_dx(x, mean, ls), auto)


@pytest.mark.parametrize("kwargs,match", [
    (dict(U=torch.zeros(3)), r"U must be \[M, D\], got shape \(3,\)"),
    (dict(w=torch.zeros(4)), r"w must be \[M=3\], got shape \(4,\)"),
    (dict(params=torch.zeros(5, 2, 4)), r"params must be \[S, 1, D=4\] for bernoulli, got shape \(5, 2, 4\)"),
    (dict(data_term=torch.zeros(4)), r"data_term must be \[S=5\], got shape \(4,\)"),
    (dict(likelihood="gaussian"), r"likelihood must be one of"),
    (dict(params=torch.zeros(1, 1, 4), data_term=torch.zeros(1)), r"at least 2 samples"),
])
def test_argument_errors(kwargs, match):
    args = dict(U=torch.zeros(3, 4), w=torch.zeros(3), params=torch.zeros(5, 1, 4), data_term=torch.zeros(5),
                likelihood="bernoulli")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.coreset_grads(**args)
