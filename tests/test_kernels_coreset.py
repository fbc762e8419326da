"""kernels.coreset_grads (fused) against the literal, unfused Monte Carlo estimator in float64.
Triton runs interpreted on CPU tensors or compiled on CUDA tensors (see tests/conftest.py)."""
import importlib

import pytest
import torch

import kernels
from tests.helpers import triton_skip_reason
from tests.test_kernels_mixture import CUDA_SKIP
# the package attribute `coreset_grads` is the function; the module is reached explicitly
cg = importlib.import_module("kernels.coreset_grads")
from kernels import coreset_reference as ref  # noqa: E402


TRITON_SKIP = triton_skip_reason(cg._triton_module)
CASES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)),
]
LIKELIHOODS = ["bernoulli", "logistic"]
SHAPES = [(13, 29, 37), (1, 2, 1), (40, 17, 5)]
FP32 = 2.0**-24


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # several tiles, sample splits and ragged edges in every dimension for M=13, S=29, D=37
    monkeypatch.setattr(cg, "CPU_BLOCKS", ((16, 16, 16, 1), (16, 16, 16, 1)))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


def assert_ran_compiled(device):
    if device != "cuda":
        return
    from triton.runtime.jit import JITFunction
    ct = cg._triton_module(torch.device("cuda"))
    for fn in (ct._logistic_pairwise_kernel, ct._logistic_grad_kernel):
        assert isinstance(fn, JITFunction) and any(len(c[0]) for c in fn.device_caches.values()), fn


def fp32_tol(D, S):
    """Relative error of the fp32 Triton path: each pairwise entry sums D per-pixel log-pmfs (a few
    ulps each), the gradient pass S terms; the float64 residual arithmetic adds nothing."""
    return 64 * (D + S) * FP32


def make_problem(M, S, D, likelihood, seed=0, dtype=torch.float64, device="cpu"):
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
    return [t.to(device=device, dtype=dtype) for t in (U, w, params, data_term)]


def rel_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("impl,device", CASES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_unfused_estimator(impl, device, likelihood, shape):
    M, S, D = shape
    U, w, params, data_term = make_problem(M, S, D, likelihood, seed=10 * LIKELIHOODS.index(likelihood)
                                           + SHAPES.index(shape), device=device)
    gU, gw, r = kernels.coreset_grads(U, w, params, data_term, likelihood, impl=impl)
    gU_ref, gw_ref, r_ref = ref.coreset_grads_reference(*(t.cpu() for t in (U, w, params, data_term)), likelihood)
    assert gU.shape == (M, D) and gw.shape == (M,) and r.shape == (S,)
    assert gU.dtype == U.dtype and gw.dtype == w.dtype
    # float64 paths (torch; bernoulli on any impl): same maths, other summation order, a few
    # hundred ulps of float64 at most; Triton's logistic kernels compute in fp32
    tol = 1e-10 if (impl == "torch" or likelihood == "bernoulli") else fp32_tol(D, S)
    assert rel_err(gU, gU_ref) < tol
    assert rel_err(gw, gw_ref) < tol
    assert rel_err(r, r_ref) < tol
    assert abs(r.sum().item()) < 1e-6 * r.abs().max().item() * S  # centred: S float64 terms
    assert_ran_compiled(device if likelihood == "logistic" else "cpu")


@pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)
@pytest.mark.parametrize("shape", [(100, 300, 784), (37, 1001, 101)])
def test_cuda_large_shapes(shape):
    """Compiled kernels over many tiles and sample splits (Fashion-MNIST pixel count; a ragged
    pixel tile) against the float64 torch path."""
    M, S, D = shape
    U, w, params, data_term = make_problem(M, S, D, "logistic", seed=20 + D, device="cuda")
    out = kernels.coreset_grads(U.float(), w.float(), params.float(), data_term, "logistic", impl="triton")
    out64 = kernels.coreset_grads(U, w, params, data_term, "logistic", impl="torch")
    for a, b in zip(out, out64):
        assert rel_err(a, b) < fp32_tol(D, S)
    assert_ran_compiled("cuda")


@pytest.mark.parametrize("impl,device", CASES)
def test_fp32_inputs(impl, device):
    U, w, params, data_term = make_problem(13, 29, 37, "logistic", seed=3)
    ref_out = ref.coreset_grads_reference(U, w, params, data_term, "logistic")
    out = kernels.coreset_grads(*(t.float().to(device) for t in (U, w, params, data_term)), "logistic", impl=impl)
    assert out[0].dtype == torch.float32
    for a, b in zip(out, ref_out):
        # fp32 inputs: the data term (~5e4) rounded to fp32 dominates the residual error
        assert rel_err(a, b) < max(fp32_tol(37, 29), 1e-4)


@pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)
def test_triton_failure_of_an_auto_choice_falls_back(monkeypatch):
    """As for the mixture op: a Triton error where impl='auto' chose Triton (the coreset update on a GPU)
    switches coreset_grads to its torch path with one warning; an explicit impl='triton' raises it."""
    from triton.errors import TritonError

    from kernels import dispatch

    class Refused(TritonError):
        pass

    def refuse(launch, device):
        raise Refused("out of shared memory")

    monkeypatch.setattr(cg, "_run", refuse)
    monkeypatch.setattr(cg, "resolve_impl", lambda t, impl="auto": "triton" if impl == "auto" else impl)
    monkeypatch.setattr(dispatch, "_TRITON_FAILED", {})
    problem = [t.float() for t in make_problem(13, 29, 37, "logistic", seed=5)]
    with pytest.raises(Refused):
        kernels.coreset_grads(*problem, "logistic", impl="triton")
    with pytest.warns(RuntimeWarning, match=r"coreset_grads: the Triton kernels failed .*Refused: out of shared"):
        out = kernels.coreset_grads(*problem, "logistic")
    for a, b in zip(out, kernels.coreset_grads(*problem, "logistic", impl="torch")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert dispatch.triton_failed("coreset_grads") and not dispatch.triton_failed("mixture_logpdf")


def test_bernoulli_grad_U_is_rank_one():
    U, w, params, data_term = make_problem(13, 29, 37, "bernoulli", seed=4)
    gU, _, r = kernels.coreset_grads(U, w, params, data_term, "bernoulli")
    v = params[:, 0, :].T @ r  # sum_s l_s R~_s
    torch.testing.assert_close(gU, -w[:, None] * v[None, :] / (29 - 1))


@pytest.mark.parametrize("impl,device", CASES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_coreset_equal_to_data_has_zero_gradient(impl, device, likelihood):
    """U = the data with unit weights makes pi_Uw = pi_X: residual and gradients vanish."""
    X, _, params, _ = make_problem(11, 23, 9, likelihood, seed=5, device=device)
    w = torch.ones(11, dtype=torch.float64, device=device)
    data_term = kernels.pairwise_log_prob(X, params, likelihood, impl="torch").sum(0)
    gU, gw, r = kernels.coreset_grads(X, w, params, data_term, likelihood, impl=impl)
    scale = data_term.abs().max().item()
    # the residual cancels sums of 11 x 9 log-pmfs: float64 ulps (torch, bernoulli on any impl),
    # fp32 ulps (Triton logistic)
    tol = 1e-12 if (impl == "torch" or likelihood == "bernoulli") else 16 * 11 * 9 * FP32
    assert r.abs().max() < tol * scale
    assert gw.abs().max() < tol * scale * 10
    assert gU.abs().max() < tol * scale * 100
    # and a perturbed weight gives a non-zero gradient (the test above can fail)
    w2 = w.clone()
    w2[0] = 2.0
    _, gw2, _ = kernels.coreset_grads(X, w2, params, data_term, likelihood, impl=impl)
    assert gw2.abs().max() > 1e3 * tol * scale


@pytest.mark.parametrize("impl,device", CASES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_pairwise_log_prob(impl, device, likelihood):
    X, _, params, _ = make_problem(13, 29, 37, likelihood, seed=6, device=device)
    out = kernels.pairwise_log_prob(X, params, likelihood, impl=impl)
    full = ref.log_prob_elementwise(X.cpu()[:, None, :], params.cpu()[None], likelihood).sum(-1)
    assert out.shape == (13, 29)
    # float64 sums of 37 pixels (torch, bernoulli) or fp32 log-pmfs, a few ulps each (Triton)
    assert rel_err(out, full) < (1e-12 if impl == "torch" or likelihood == "bernoulli" else 16 * 37 * FP32)


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
