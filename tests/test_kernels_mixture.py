"""kernels.mixture_logpdf: torch (chunked) and Triton (interpreter on CPU) paths against a
float64 direct computation, forward and all four gradients."""
import math
import os

# Triton picks compile vs interpret when it is first imported: set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from tests.helpers import triton_skip_reason  # noqa: E402
from kernels import mixture as mix  # noqa: E402
from kernels import mixture_reference as ref  # noqa: E402


TRITON_SKIP = triton_skip_reason(mix._triton_module)
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP))]
MODES = ["shared", "component", "diag"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Several tiles + ragged edges on small shapes (B=37, M=53 with 16 x 32 tiles).
    monkeypatch.setattr(mix, "CPU_BLOCKS", (16, 32))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


def make_inputs(B, M, d, mode, dtype=torch.float32, seed=0, offset=0.0, spread=1.0, lv_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    means = offset + spread * torch.randn(M, d, generator=g, dtype=torch.float64)
    # z near random components so responsibilities are neither uniform nor all one-hot
    z = means[torch.randint(0, M, (B,), generator=g)] + 0.7 * torch.randn(B, d, generator=g, dtype=torch.float64)
    log_weights = torch.randn(M, generator=g, dtype=torch.float64)
    shape = {"shared": (), "component": (M,), "diag": (M, d)}[mode]
    log_var = lv_scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (z, means, log_weights, log_var)]


def run_with_grads(fn, inputs, upstream):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, upstream.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def reference64(inputs, upstream):
    return run_with_grads(ref.mixture_logpdf_naive, [t.double() for t in inputs], upstream.double())


def assert_close_scaled(actual, expected, rtol, name):
    """Error relative to the tensor's largest entry (gradients mix big and tiny entries)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{name}: scaled error {err:.3g} > {rtol}"


# ---------------------------------------------------------------------------------------
# Forward + backward against float64
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(37, 53, 7), (5, 1, 3), (70, 33, 20)])
def test_matches_float64_reference(impl, mode, shape):
    B, M, d = shape
    inputs = make_inputs(B, M, d, mode, seed=hash((impl, mode, shape)) % 1000)
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(1))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl, chunk=16), inputs, upstream)
    out64, grads64 = reference64(inputs, upstream)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-4)
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert g.shape == inputs[["z", "means", "log_weights", "log_var"].index(name)].shape
        # A shared log-variance's gradient sums B x M fp32 terms that partly cancel: ~4e-5 seen.
        rtol = 1e-4 if (name == "log_var" and mode == "shared") else 2e-5
        assert_close_scaled(g, g64, rtol, f"{impl}/{mode}/{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_widely_separated_components(impl, mode):
    """Components ~30 units apart with std ~0.37 (80 std): responsibilities are 0/1 and most
    exp() underflow; the online LSE must stay finite. The matmul form's documented error bound
    (docs/KERNELS.md) is ~eps * |x - centre|^2 * precision, so the tolerance follows it."""
    B, M, d = 29, 41, 5
    z, means, lw, lv = make_inputs(B, M, d, mode, seed=3, spread=30.0, lv_scale=0.0)
    lv = lv - 2.0  # variance e^-2
    lw[:7] = -math.inf  # some zero-weight components
    inputs = [z, means, lw, lv]
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(2))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl, chunk=16), inputs, upstream)
    out64, grads64 = reference64(inputs, upstream)
    assert torch.isfinite(out).all()
    assert out.min() < -1e3  # some z far from every component: big negative log-densities
    centre = means.double().mean(0)
    radius2 = ((z.double() - centre) ** 2).sum(1).max() + ((means.double() - centre) ** 2).sum(1).max()
    bound = 8 * 2.0**-24 * radius2 * math.exp(2.0)
    assert (out.double() - out64).abs().max() <= bound, f"error above documented bound {bound:.3g}"
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert_close_scaled(g, g64, 5e-3, f"{impl}/{mode}/{name}")
    assert (grads[2][:7] == 0).all()


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # interpreter: log(0) = -inf, intended
@pytest.mark.parametrize("impl", IMPLS)
def test_all_weights_minus_inf_gives_zero_gradient(impl):
    z, means, lw, lv = make_inputs(6, 5, 3, "shared")
    lw = torch.full_like(lw, -math.inf)
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl), [z, means, lw, lv], torch.ones(6))
    assert (out == -math.inf).all()
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_far_from_origin_fp32(impl, mode):
    """z and means ~1e3 from the origin with unit spread: fp32 must keep the distances."""
    B, M, d = 37, 53, 7
    inputs = make_inputs(B, M, d, mode, seed=5, offset=1000.0)
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(4))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl, chunk=16), inputs, upstream)
    out64, grads64 = reference64(inputs, upstream)
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=2e-4)
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert_close_scaled(g, g64, 1e-4, f"{impl}/{mode}/{name}")


def test_far_from_origin_needs_centring():
    """Sanity check that the previous test can fail: the uncentred expanded form in fp32 is
    off by O(1) nats on the same inputs."""
    z, means, lw, lv = make_inputs(37, 53, 7, "shared", seed=5, offset=1000.0)
    d2 = (z * z).sum(1)[:, None] + (means * means).sum(1)[None, :] - 2 * z @ means.T
    naive32 = torch.logsumexp(lw - 0.5 * 7 * (ref.LOG_2PI + lv) - 0.5 * d2 * torch.exp(-lv), dim=1)
    out64 = ref.mixture_logpdf_naive(*[t.double() for t in (z, means, lw, lv)])
    assert (naive32.double() - out64).abs().max() > 0.1
    good = kernels.mixture_logpdf(z, means, lw, lv, impl="torch")
    assert (good.double() - out64).abs().max() < 2e-4


@pytest.mark.parametrize("mode", MODES)
def test_torch_path_bf16(mode):
    """bf16 inputs: computed in fp32 internally, output/grad rounded to bf16."""
    inputs = make_inputs(37, 53, 7, mode, dtype=torch.bfloat16, seed=6)
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(5))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl="torch", chunk=16), inputs, upstream)
    out64, grads64 = reference64(inputs, upstream.bfloat16().float())
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(out.double(), out64, rtol=1e-2, atol=5e-2)
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert_close_scaled(g, g64, 2e-2, f"bf16/{mode}/{name}")


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_torch_path(mode):
    inputs = [t.detach().requires_grad_() for t in make_inputs(5, 7, 3, mode, dtype=torch.float64, seed=7)]
    assert torch.autograd.gradcheck(lambda *a: kernels.mixture_logpdf(*a, impl="torch", chunk=3), inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_autograd_saves_no_pairwise_tensor(impl):
    """Memory O((B + M) d): nothing of size B x M is saved for backward."""
    B, M, d = 64, 96, 4
    inputs = [t.requires_grad_() for t in make_inputs(B, M, d, "diag")]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = kernels.mixture_logpdf(*inputs, impl=impl, chunk=16)
    out.sum().backward()
    assert saved and max(saved) <= max(B, M) * d


# ---------------------------------------------------------------------------------------
# torch.compile (custom op registered with torch.library)
# ---------------------------------------------------------------------------------------
class MixturePrior(torch.nn.Module):
    def __init__(self, M, d, impl):
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.means = torch.nn.Parameter(torch.randn(M, d, generator=g))
        self.log_weights = torch.nn.Parameter(torch.randn(M, generator=g))
        self.log_var = torch.nn.Parameter(torch.tensor(-0.5))
        self.impl = impl

    def forward(self, z):
        return kernels.mixture_logpdf(torch.tanh(z) * 2, self.means, self.log_weights - math.log(3.0),
                                      self.log_var, impl=self.impl).mean()


@pytest.mark.parametrize("impl,backend", [("torch", "inductor"), pytest.param(
    "triton", "aot_eager", marks=pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP))])
def test_torch_compile_fullgraph(impl, backend):
    torch._dynamo.reset()
    model = MixturePrior(19, 5, impl)
    z = torch.randn(23, 5, generator=torch.Generator().manual_seed(9), requires_grad=True)
    eager = model(z)
    eager_grads = torch.autograd.grad(eager, [z, *model.parameters()])
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph break
    out = compiled(z)
    grads = torch.autograd.grad(out, [z, *model.parameters()])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)


def test_custom_op_opcheck():
    """torch.library's own consistency checks (schema, fake impl, autograd registration)."""
    inputs = [t.requires_grad_() for t in make_inputs(6, 5, 3, "component")]
    for impl in ["torch"] + ([] if TRITON_SKIP else ["triton"]):
        torch.library.opcheck(torch.ops.bype_kernels.mixture_logpdf.default, (*inputs, impl, 0))


# ---------------------------------------------------------------------------------------
# Implementation choice and argument errors
# ---------------------------------------------------------------------------------------
def test_resolve_impl_auto_cpu_is_torch():
    assert kernels.resolve_impl(torch.zeros(1)) == "torch"
    assert kernels.resolve_impl(torch.zeros(1), "torch") == "torch"


def test_resolve_impl_env_override(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.resolve_impl(torch.zeros(1), "auto") == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.resolve_impl(torch.zeros(1), "auto")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    # the override applies to "auto" only; an explicit impl wins
    assert kernels.resolve_impl(torch.zeros(1), "torch") == "torch"
    if kernels.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.resolve_impl(torch.zeros(1), "auto") == "triton"


@pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)
def test_env_override_runs_triton(monkeypatch):
    inputs = make_inputs(9, 11, 3, "shared")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    out_t = kernels.mixture_logpdf(*inputs)  # auto -> triton via the environment
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    out_c = kernels.mixture_logpdf(*inputs)
    torch.testing.assert_close(out_t, out_c, rtol=1e-5, atol=1e-5)


def test_resolve_impl_errors(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.resolve_impl(torch.zeros(1), "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.resolve_impl(torch.zeros(1), "triton")


@pytest.mark.parametrize("bad,match", [
    (dict(z=torch.zeros(4)), r"z must be \[B, d\], got shape \(4,\)"),
    (dict(means=torch.zeros(5, 2)), r"means must be \[M, d=3\], got shape \(5, 2\)"),
    (dict(log_weights=torch.zeros(4)), r"log_weights must be \[M=5\], got shape \(4,\)"),
    (dict(log_var=torch.zeros(5, 2)), r"log_var must be 0-dim, \[M=5\] or \[M=5, d=3\], got shape \(5, 2\)"),
    (dict(z=torch.zeros(4, 3, dtype=torch.long)), r"z must be floating point"),
])
def test_shape_errors(bad, match):
    args = dict(z=torch.zeros(4, 3), means=torch.zeros(5, 3), log_weights=torch.zeros(5), log_var=torch.zeros(()))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.mixture_logpdf(**args)


def test_float_log_var_and_import_isolation():
    z, means, lw, _ = make_inputs(4, 3, 2, "shared")
    a = kernels.mixture_logpdf(z, means, lw, 0.25, impl="torch")
    b = kernels.mixture_logpdf(z, means, lw, torch.tensor(0.25), impl="torch")
    torch.testing.assert_close(a, b)
    import subprocess
    import sys
    code = "import sys, kernels; assert 'bype' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_bench_kernels_smoke(tmp_path):
    """`bype bench kernels` on a tiny sweep writes a table, JSON rows with timings, and a plot."""
    import argparse
    import json
    bench = pytest.importorskip("bype.bench.kernels")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--B", "16", "--M", "20,3000", "--d", "3", "--impls", "naive,chunked,triton",
                              "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--mem-limit-gb", "0.0001",
                              "--out", str(tmp_path)])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = {(r["impl"], r["passes"], r["M"]): r for r in data["rows"]}
    assert rows[("chunked", "fwdbwd", 20)]["time_s"] > 0
    assert rows[("naive", "fwd", 20)]["speedup_vs_naive"] == 1.0
    assert "skipped" in rows[("naive", "fwd", 3000)]  # 16 x 3000 x 4 B x 3 > 0.0001 GiB
    assert "triton" in data["meta"]["unavailable"]  # CPU: not timed
    assert "| chunked | fwd | 16 | 20 | 3 |" in (tmp_path / "kernels.md").read_text()
    assert (tmp_path / "kernels.png").stat().st_size > 0
