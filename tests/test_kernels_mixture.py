"""kernels.mixture_logpdf: torch (chunked) and Triton paths against a float64 direct
computation, forward and all four gradients. Triton runs interpreted on CPU tensors (no CUDA
device: tests/conftest.py sets TRITON_INTERPRET=1) or compiled on CUDA tensors (a CUDA device
and TRITON_INTERPRET unset or 0); each case names its (impl, device)."""
import math
import os

import pytest
import torch

import kernels
from tests.helpers import triton_skip_reason
from kernels import mixture as mix
from kernels import mixture_reference as ref
from kernels import tiling


def _cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if kernels.interpreter_enabled():
        return "TRITON_INTERPRET=1: CUDA kernels would run interpreted"
    if not kernels.triton_available():
        return "triton not installed"
    return ""


TRITON_SKIP = triton_skip_reason(mix._triton_module)
CUDA_SKIP = _cuda_skip_reason()
CASES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)),
]
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP))]
# The Triton cases once per plan of the Triton path (kernels.mixture.triton_plan): the one-launch fused kernels
# and the split path (preparation, tiled split passes, combination); the fixture below sets BYPE_MIXTURE_PLAN.
PLAN_CASES = [pytest.param("torch", "cpu", None, id="torch-cpu")] + [
    pytest.param("triton", device, plan, id=f"triton-{device}-{plan}",
                 marks=pytest.mark.skipif(bool(skip), reason=skip))
    for device, skip in (("cpu", TRITON_SKIP), ("cuda", CUDA_SKIP)) for plan in mix.PLANS]
MODES = ["shared", "component", "diag"]
SHAPES = [(37, 53, 7), (5, 1, 3), (70, 33, 20), (19, 45, 40)]  # d = 40: two column parts (32 + 16, diag 64 + 16)
FP32 = 2.0**-24


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, request):
    # CPU (interpreter): several tiles, splits and padded edges on small shapes (B=37, M=53
    # with 16 x 32 tiles). CUDA uses the launchers' own table.
    monkeypatch.setattr(mix, "CPU_BLOCKS", (16, 32))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    plan = request.node.callspec.params.get("plan") if hasattr(request.node, "callspec") else None
    if plan:
        monkeypatch.setenv(mix.PLAN_ENV, plan)
    else:
        monkeypatch.delenv(mix.PLAN_ENV, raising=False)


def make_inputs(B, M, d, mode, dtype=torch.float32, seed=0, offset=0.0, spread=1.0, lv_scale=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    means = offset + spread * torch.randn(M, d, generator=g, dtype=torch.float64)
    # z near random components so responsibilities are neither uniform nor all one-hot
    z = means[torch.randint(0, M, (B,), generator=g)] + 0.7 * torch.randn(B, d, generator=g, dtype=torch.float64)
    log_weights = torch.randn(M, generator=g, dtype=torch.float64)
    shape = {"shared": (), "component": (M,), "diag": (M, d)}[mode]
    log_var = lv_scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (z, means, log_weights, log_var)]


def run_with_grads(fn, inputs, upstream):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, upstream.to(device=out.device, dtype=out.dtype))
    return out.detach().cpu(), [g.detach().cpu() for g in grads]


def reference64(inputs, upstream):
    return run_with_grads(ref.mixture_logpdf_naive, [t.detach().cpu().double() for t in inputs], upstream.double())


def assert_close_scaled(actual, expected, rtol, name):
    """Error relative to the tensor's largest entry (gradients mix big and tiny entries)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{name}: scaled error {err:.3g} > {rtol:.3g}"


def dot_unit(impl, device):
    """Relative error of one product in the distance dot: fp32 rounding (torch, interpreter) or
    the 3xTF32 bound that test_tf32_split_accuracy checks by emulation (compiled CUDA)."""
    return 2.0**-19 if (impl, device) == ("triton", "cuda") else FP32


def score_scale(inputs):
    """max_b,m p_m (|z_b - c|^2 + |m_m - c|^2): what a squared distance's rounding is relative to."""
    z, means, _, lv = (t.detach().cpu().double() for t in inputs)
    c = means.mean(0)
    r2 = ((z - c) ** 2).sum(1).max() + ((means - c) ** 2).sum(1).max()
    return float(r2 * torch.exp(-lv).max())


def tolerances(impl, device, inputs):
    """(forward atol, gradient scaled rtol, shared-log_var gradient rtol): a score's error is a
    few units of the dot times the score scale, a responsibility's relative error the same, and
    a gradient adds fp32 rounding of its sum (M terms for z, B for a component, B*M shared)."""
    B, M = inputs[0].shape[0], inputs[1].shape[0]
    s = 8 * dot_unit(impl, device) * max(score_scale(inputs), 1.0)
    return s, 2 * s + 4 * max(B, M) * FP32, 2 * s + 4 * B * M * FP32


def assert_ran_compiled(device, plan):
    """On CUDA the Triton kernels of the plan must be compiled JIT functions with compiled binaries cached
    (TRITON_INTERPRET would silently run them interpreted)."""
    if device != "cuda":
        return
    from triton.runtime.jit import JITFunction
    mt = mix._triton_module(torch.device("cuda"))
    names = {"fused": ("_mixture_fused_fwd_kernel", "_mixture_fused_bwd_kernel"),
             "split": ("_mixture_fwd_kernel", "_mixture_bwd_z_kernel", "_mixture_bwd_m_kernel")}[plan]
    for fn in (getattr(mt, name) for name in names):
        assert isinstance(fn, JITFunction), f"{fn} is not a compiled JITFunction"
        assert any(len(cache[0]) for cache in fn.device_caches.values()), f"{fn} has no compiled binary"


# ---------------------------------------------------------------------------------------
# Forward + backward against float64
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(impl, device, plan, mode, shape):
    B, M, d = shape
    inputs = make_inputs(B, M, d, mode, seed=10 * MODES.index(mode) + SHAPES.index(shape), device=device)
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(1))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl, chunk=16), inputs, upstream)
    out64, grads64 = reference64(inputs, upstream)
    assert out.dtype == torch.float32
    atol, rtol, rtol_shared = tolerances(impl, device, inputs)
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=atol)
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert g.shape == inputs[["z", "means", "log_weights", "log_var"].index(name)].shape
        assert_close_scaled(g, g64, rtol_shared if (name == "log_var" and mode == "shared") else rtol,
                            f"{impl}/{device}/{mode}/{name}")
    assert_ran_compiled(device, plan)


# Larger than one tile on CUDA: the small-problem tiles with splits, the 64-wide tiles, a ragged
# M split over many programs, and K = 128 (diagonal d = 40).
CUDA_SHAPES = [(300, 2100, 40), (600, 4000, 40), (100, 25000, 16), (1030, 3001, 64)]


@pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_large_shapes(mode, shape):
    """Compiled kernels at sizes with many tiles against the float64 torch path (chunked, itself
    checked against the naive float64 reference above)."""
    B, M, d = shape
    inputs = make_inputs(B, M, d, mode, seed=40 + CUDA_SHAPES.index(shape), device="cuda")
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(3))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl="triton"), inputs, upstream)
    out64, grads64 = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl="torch"),
                                    [t.double() for t in inputs], upstream.double())
    atol, rtol, rtol_shared = tolerances("triton", "cuda", inputs)
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=atol)
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert_close_scaled(g, g64, rtol_shared if (name == "log_var" and mode == "shared") else rtol,
                            f"cuda/{shape}/{mode}/{name}")
    assert_ran_compiled("cuda", "split")  # what auto runs at these shapes


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES[1:])
@pytest.mark.parametrize("mode", MODES)
def test_strided_and_bf16_inputs(impl, device, plan, mode):
    """The preparation kernels read the inputs themselves: rows with a stride (column slices), a
    transposed (non-contiguous) means tensor and bf16 inputs give what contiguous fp32 copies of the
    same values give, with gradients in the inputs' dtypes."""
    z, means, lw, lv = make_inputs(37, 53, 7, mode, seed=21, device=device)
    wide = torch.cat([z, torch.randn_like(z)], 1)[:, :7]  # row stride 14
    means_t = means.t().contiguous().t()  # column-major
    lw_s = torch.stack([lw, lw], 1)[:, 0]  # stride 2
    strided = [wide, means_t, lw_s, lv]
    assert not wide.is_contiguous() and not means_t.is_contiguous() and not lw_s.is_contiguous()
    fn = lambda *a: kernels.mixture_logpdf(*a, impl=impl)  # noqa: E731
    up = torch.linspace(-1.0, 1.0, 37)
    out_s, grads_s = run_with_grads(fn, strided, up)
    out_c, grads_c = run_with_grads(fn, [t.contiguous() for t in strided], up)
    torch.testing.assert_close(out_s, out_c, rtol=0, atol=0)
    for gs, gc in zip(grads_s, grads_c):
        torch.testing.assert_close(gs, gc, rtol=0, atol=0)
    bf = [t.to(torch.bfloat16) for t in (z, means, lw, lv)]
    out_b, grads_b = run_with_grads(fn, bf, up)
    out_f, grads_f = run_with_grads(fn, [t.float() for t in bf], up)  # the same values, fp32
    assert out_b.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads_b)
    # the kernels compute in fp32 either way; only the results are rounded to bf16 (8 mantissa bits)
    torch.testing.assert_close(out_b.float(), out_f, rtol=2.0**-8, atol=2.0**-8 * out_f.abs().max().item())
    for gb, gf in zip(grads_b, grads_f):
        assert_close_scaled(gb.float(), gf, 2.0**-7, "bf16 gradient")


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_widely_separated_components(impl, device, plan, mode):
    """Components ~30 units apart with std ~0.37 (80 std): responsibilities are 0/1 and most
    exp() underflow; the online LSE must stay finite. The matmul form's documented error bound
    (docs/KERNELS.md) is ~eps * |x - centre|^2 * precision, so the tolerance follows it."""
    B, M, d = 29, 41, 5
    z, means, lw, lv = make_inputs(B, M, d, mode, seed=3, spread=30.0, lv_scale=0.0, device=device)
    lv = lv - 2.0  # variance e^-2
    lw[:7] = -math.inf  # some zero-weight components
    inputs = [z, means, lw, lv]
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(2))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl, chunk=16), inputs, upstream)
    out64, grads64 = reference64(inputs, upstream)
    assert torch.isfinite(out).all()
    assert out.min() < -1e3  # some z far from every component: big negative log-densities
    bound = 8 * dot_unit(impl, device) * score_scale(inputs)  # documented: units x |x - c|^2 x precision
    assert (out.double() - out64).abs().max() <= bound, f"error above documented bound {bound:.3g}"
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        # 0/1 responsibilities: a gradient's relative error is the score error (~1e-3 here) itself
        assert_close_scaled(g, g64, max(5e-3, 2 * bound), f"{impl}/{device}/{mode}/{name}")
    assert (grads[2][:7] == 0).all()
    assert_ran_compiled(device, plan)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # interpreter: log(0) = -inf, intended
@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
def test_all_weights_minus_inf_gives_zero_gradient(impl, device, plan):
    z, means, lw, lv = make_inputs(6, 5, 3, "shared", device=device)
    lw = torch.full_like(lw, -math.inf)
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl), [z, means, lw, lv], torch.ones(6))
    assert (out == -math.inf).all()
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
def test_nan_input_gives_nan_not_zero_gradient(impl, device, plan):
    """A NaN input must show in the output and the gradients of its row (not be zeroed away)."""
    z, means, lw, lv = make_inputs(6, 5, 3, "shared", device=device)
    z[2, 1] = math.nan
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl), [z, means, lw, lv], torch.ones(6))
    assert out[2].isnan() and not out[[0, 1, 3, 4, 5]].isnan().any()
    assert grads[0][2].isnan().all()
    assert grads[1].isnan().any() and grads[3].isnan()


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
@pytest.mark.parametrize("seed", [2, 3, 5])
def test_row_far_from_every_component(impl, device, plan, seed):
    """Rows 30 and 60 units from every component (log-densities ~ -450 and -1800 nats): every exp() of the
    row underflows but the nearest component's, so its responsibilities exist only as the backward's scores
    minus the forward's log-sum-exp, and its gradient must still pull it towards that component (not vanish,
    not blow up). The error follows the suite's score-scale tolerance, which grows with the distance
    squared (docs/KERNELS.md, "Numerics": responsibilities far out)."""
    g = torch.Generator().manual_seed(seed)
    B, M, d = 4, 8, 4
    means = torch.randn(M, d, generator=g)
    z = means[:B] + 0.7 * torch.randn(B, d, generator=g)
    z[0] += 30.0 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    z[1] += 60.0 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    inputs = [t.to(device) for t in (z, means, torch.randn(M, generator=g), torch.tensor(0.0))]
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl), inputs, torch.ones(B))
    out64, grads64 = reference64(inputs, torch.ones(B))
    atol, rtol, rtol_shared = tolerances(impl, device, inputs)
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=atol)
    assert out[1] < -1000
    for name, g_, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert_close_scaled(g_, g64, rtol_shared if name == "log_var" else rtol, f"{impl}/{device}/{plan}/{name}")
    for row in (0, 1):  # back towards the components, about as hard as the distance (unit variance)
        pull = means.mean(0) - z[row]
        cosine = torch.dot(grads[0][row], pull) / (grads[0][row].norm() * pull.norm())
        assert cosine > 0.9 and 0.5 < grads[0][row].norm() / pull.norm() < 2.0, (row, cosine)


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_far_from_origin_fp32(impl, device, plan, mode):
    """z and means ~1e3 from the origin with unit spread: fp32 must keep the distances."""
    B, M, d = 37, 53, 7
    inputs = make_inputs(B, M, d, mode, seed=5, offset=1000.0, device=device)
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(4))
    out, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl, chunk=16), inputs, upstream)
    out64, grads64 = reference64(inputs, upstream)
    atol, rtol, rtol_shared = tolerances(impl, device, inputs)  # centred: the offset does not count
    # + fp32 rounding of the ~1e3 inputs themselves before centring: 1e3^2 eps per distance
    atol += 4 * 1e6 * FP32 * max(1.0, float(torch.exp(-inputs[3].double()).max()))
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=atol)
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        assert_close_scaled(g, g64, max(rtol_shared if mode == "shared" and name == "log_var" else rtol, 2 * atol),
                            f"{impl}/{device}/{mode}/{name}")


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


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
def test_autograd_saves_no_pairwise_tensor(impl, device, plan):
    """Memory O((B + M) d): nothing of size B x M is saved for backward."""
    B, M, d = 64, 96, 4
    inputs = [t.requires_grad_() for t in make_inputs(B, M, d, "diag", device=device)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = kernels.mixture_logpdf(*inputs, impl=impl, chunk=16)
    out.sum().backward()
    assert saved and max(saved) <= max(B, M) * d


# ---------------------------------------------------------------------------------------
# torch.compile (custom op registered with torch.library)
# ---------------------------------------------------------------------------------------
class MixturePrior(torch.nn.Module):
    def __init__(self, M, d, impl, device="cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.means = torch.nn.Parameter(torch.randn(M, d, generator=g).to(device))
        self.log_weights = torch.nn.Parameter(torch.randn(M, generator=g).to(device))
        self.log_var = torch.nn.Parameter(torch.tensor(-0.5, device=device))
        self.impl = impl

    def forward(self, z):
        return kernels.mixture_logpdf(torch.tanh(z) * 2, self.means, self.log_weights - math.log(3.0),
                                      self.log_var, impl=self.impl).mean()


@pytest.mark.parametrize("impl,device,backend", [
    ("torch", "cpu", "inductor"),
    pytest.param("triton", "cpu", "aot_eager", marks=pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)),
    pytest.param("triton", "cuda", "inductor", marks=pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)),
])
def test_torch_compile_fullgraph(impl, device, backend):
    torch._dynamo.reset()
    model = MixturePrior(19, 5, impl, device)
    z = torch.randn(23, 5, generator=torch.Generator().manual_seed(9)).to(device).requires_grad_()
    eager = model(z)
    eager_grads = torch.autograd.grad(eager, [z, *model.parameters()])
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph break
    out = compiled(z)
    grads = torch.autograd.grad(out, [z, *model.parameters()])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
def test_custom_op_opcheck(impl, device, plan):
    """torch.library's own consistency checks (schema, fake impl, autograd registration), the
    backward op with non-contiguous inputs included: its fake must return contiguous tensors
    like the real op (Inductor asserts the strides)."""
    inputs = [t.requires_grad_() for t in make_inputs(6, 5, 3, "component", device=device)]
    torch.library.opcheck(torch.ops.bype_kernels.mixture_logpdf.default, (*inputs, impl, 0))
    z, means, lw, lv = (t.detach() for t in inputs)
    z_t = z.T.contiguous().T  # same values, column-major strides
    out = kernels.mixture_logpdf(z, means, lw, lv, impl=impl)
    grad = torch.ones_like(out)
    torch.library.opcheck(torch.ops.bype_kernels.mixture_logpdf_backward.default,
                          (grad, z_t, means, lw, lv, out.float(), impl, 0, True, True))
    for g in torch.ops.bype_kernels.mixture_logpdf_backward(grad, z_t, means, lw, lv, out.float(), impl, 0, True, True):
        assert g.is_contiguous()


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_keeps_the_inputs_precision(impl, device, plan, compiled):
    """dist.precision=bf16 runs the loss, prior included, under bf16 autocast. The op must still compute in
    its inputs' dtype, forward and backward (also when the backward runs inside the autocast region): the
    torch path's products in bf16 put ~0.1-1 nat of error on every score here (the distances cancel)."""
    inputs = make_inputs(37, 53, 20, "shared", seed=31, spread=3.0, device=device)
    up = torch.randn(37, generator=torch.Generator().manual_seed(5))
    fn = lambda *a: kernels.mixture_logpdf(*a, impl=impl)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, grads = run_with_grads(fn, inputs, up)
    with torch.autocast(device, dtype=torch.bfloat16):
        out_ac, grads_ac = run_with_grads(fn, inputs, up)
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0)
    for g_ac, g in zip(grads_ac, grads):
        torch.testing.assert_close(g_ac, g, rtol=0, atol=0)


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
def test_eager_calls_skip_the_custom_op_dispatch(impl, device, plan):
    """Eager calls run the op bodies through an autograd.Function: torch.library's dispatch and autograd wrapper
    cost host time on a launch-bound call. torch.compile still traces the custom ops (test_torch_compile_fullgraph,
    test_custom_op_opcheck). First-order gradients only, like the ops: a second derivative is one clear error."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Namespaces(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.namespace)
            return func(*args, **(kwargs or {}))

    inputs = [t.requires_grad_() for t in make_inputs(6, 5, 3, "shared", device=device)]
    with Namespaces() as mode:
        out = kernels.mixture_logpdf(*inputs, impl=impl)
        grads = torch.autograd.grad(out.sum(), inputs)
    assert "aten" in mode.seen and "bype_kernels" not in mode.seen
    _, grads64 = reference64(inputs, torch.ones(6))
    rtol = tolerances(impl, device, inputs)[2]
    for g, g64 in zip(grads, grads64):
        assert_close_scaled(g.cpu(), g64, rtol, "eager gradient")
    first = torch.autograd.grad(kernels.mixture_logpdf(*inputs, impl=impl).sum(), inputs, create_graph=True)
    assert first[0].requires_grad  # not a silent constant in a gradient penalty
    with pytest.raises(RuntimeError, match="mixture_logpdf_backward.*no autograd formula"):
        torch.autograd.grad(first[0].sum(), inputs)


@pytest.mark.parametrize("impl,device,plan", PLAN_CASES)
def test_z_only_backward_skips_component_kernel(impl, device, plan, monkeypatch):
    """Gradient wrt z only (e.g. a frozen prior): the component backward does not run, and the
    z gradient equals the one of a full backward."""
    launched = []
    run = mix._run
    monkeypatch.setattr(mix, "_run", lambda launch, dev: launched.append(launch) or run(launch, dev))
    z, means, lw, lv = make_inputs(37, 53, 7, "diag", seed=11, device=device)
    zr = z.clone().requires_grad_()
    (gz,) = torch.autograd.grad(kernels.mixture_logpdf(zr, means, lw, lv, impl=impl).sum(), [zr])
    _, grads = run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl=impl), [z, means, lw, lv], torch.ones(37))
    torch.testing.assert_close(gz.cpu(), grads[0], rtol=0, atol=0)
    if plan == "split":
        prep = ["_mixture_prep_rows_kernel", "_mixture_prep_components_kernel"]
        forward = [*prep, "_mixture_fwd_kernel", "_mixture_combine_fwd_kernel"]
        z_side = ["_mixture_bwd_z_kernel", "_mixture_finish_z_kernel"]
        assert [launch.kernel for launch in launched] == [*forward, *prep, *z_side, *forward, *prep, *z_side,
                                                          "_mixture_bwd_m_kernel", "_mixture_finish_m_kernel"]
    elif plan == "fused":  # one backward launch: the 3 tiles of z rows, then also the 2 tiles of components
        assert [(launch.kernel, launch.grid) for launch in launched] == [
            ("_mixture_fused_fwd_kernel", (3,)), ("_mixture_fused_bwd_kernel", (3,)),
            ("_mixture_fused_fwd_kernel", (3,)), ("_mixture_fused_bwd_kernel", (3 + 2,))]


@pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)
@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_triton_failure_of_an_auto_choice_falls_back(monkeypatch, failing):
    """A Triton release that refuses a kernel (compile error, resources) must not stop a run that left the
    choice to impl='auto' (what training uses on a GPU): the op takes its torch path from then on, with one
    warning naming the error; an explicit impl='triton' raises it. A failure in the backward, after a Triton
    forward, finishes on the torch backward from the same fp32 log-sum-exp."""
    import warnings

    from triton.errors import TritonError

    from kernels import dispatch

    class Refused(TritonError):
        pass

    run = mix._run

    def refuse(launch, device):
        if failing == "forward" or "bwd" in launch.kernel:
            raise Refused("not supported by this Triton")
        return run(launch, device)

    monkeypatch.setattr(mix, "_run", refuse)
    monkeypatch.setattr(mix, "resolve_impl", lambda t, impl="auto": "triton" if impl == "auto" else impl)  # as on CUDA
    monkeypatch.setattr(dispatch, "_TRITON_FAILED", {})
    inputs = make_inputs(37, 53, 7, "diag", seed=41)
    up = torch.randn(37, generator=torch.Generator().manual_seed(3))
    with pytest.raises(Refused):
        run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl="triton"), inputs, up)
    assert not dispatch.triton_failed(mix.OP)
    with pytest.warns(RuntimeWarning, match=r"mixture_logpdf: the Triton kernels failed on this machine "
                                            r"\(Refused: not supported by this Triton\); impl='auto' uses the torch"):
        out, grads = run_with_grads(kernels.mixture_logpdf, inputs, up)
    out64, grads64 = reference64(inputs, up)
    atol, rtol, _ = tolerances("torch", "cpu", inputs)
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=atol)
    for g, g64 in zip(grads, grads64):
        assert_close_scaled(g, g64, rtol, f"fallback after a failing {failing}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once; later calls go to the torch path directly
        again, _ = run_with_grads(kernels.mixture_logpdf, inputs, up)
    torch.testing.assert_close(again, run_with_grads(lambda *a: kernels.mixture_logpdf(*a, impl="torch"),
                                                     inputs, up)[0], rtol=0, atol=0)


def test_float64_auto_falls_back_explicit_triton_refuses(monkeypatch):
    """float64 is computed in float64 (torch path) as documented: 'auto' (here forced to Triton by
    the environment) falls back, an explicit impl='triton' (fp32 kernels) is refused."""
    z, means, lw, lv = make_inputs(9, 11, 3, "shared", dtype=torch.float64)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # resolve_impl accepts triton on CPU
    out = kernels.mixture_logpdf(z, means, lw, lv)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.mixture_logpdf_naive(z, means, lw, lv), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="float64"):
        kernels.mixture_logpdf(z, means, lw, lv, impl="triton")


# ---------------------------------------------------------------------------------------
# Precision and launch geometry (host-side, no kernel run)
# ---------------------------------------------------------------------------------------
def _tf32_round(x, mode):
    """numpy emulation of an fp32 -> tf32 conversion (10-bit mantissa): 'truncate' (what
    tensor cores do with raw fp32 bits) or 'nearest'."""
    import numpy as np
    bits = np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    if mode == "nearest":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).astype(np.int32).view(np.float32)


def test_tf32_split_accuracy():
    """The 3xTF32 claim behind the CUDA tolerances (dot_unit): with z and the means split on the
    host, lo.hi + hi.lo + hi.hi with every operand rounded to tf32 as a tensor core would is
    within 2^-19 sum |a_k b_k| of the exact dot; plain tf32 is ~2^-11 off (the bound can fail)."""
    import numpy as np
    g = torch.Generator().manual_seed(12)
    a = (torch.randn(4096, 64, generator=g) * torch.logspace(-3, 3, 64)).float()
    b = (torch.randn(4096, 64, generator=g) * torch.logspace(3, -3, 64)).float()
    a_hi, a_lo = tiling.tf32_split(a)
    b_hi, b_lo = tiling.tf32_split(b)
    for hi in (a_hi, b_hi):  # hi parts survive the tensor core's truncation unchanged
        assert (hi.numpy() == _tf32_round(hi.numpy(), "truncate")).all()
    assert ((a_hi + a_lo) == a).all() and ((b_hi + b_lo) == b).all()  # exact split
    tc = lambda t: _tf32_round(t.numpy(), "truncate").astype(np.float64)  # noqa: E731
    three = (tc(a_lo) * tc(b_hi) + tc(a_hi) * tc(b_lo) + tc(a_hi) * tc(b_hi)).sum(1)
    exact = (a.double() * b.double()).sum(1).numpy()
    scale = (a.double() * b.double()).abs().sum(1).numpy()
    assert (np.abs(three - exact) / scale).max() <= 2.0**-19
    plain = (tc(a) * tc(b)).sum(1)
    assert (np.abs(plain - exact) / scale).max() > 2.0**-12


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("mode", ["shared", "diag"])
def test_launch_geometry_fills_the_gpu(arch, mode):
    """The split plan: every kernel launches >= 2 programs per SM of an H100 at the large shapes and more
    than two at the training shape (forced there); tiles divide the padded rows (no masks in the kernels).
    The training shape itself runs the fused plan: one launch per pass over tiles of 16 rows / 32 components."""
    target = tiling.cuda_target(arch)
    for (B, M), least in [((100, 25000), 264), ((1024, 50000), 264), ((50000, 500), 264), ((100, 500), 32)]:
        launches = mix.all_launches(B, M, 40, mode, target, plan="split")
        if (B, M) != (100, 500):  # what auto runs at the large shapes
            geometry = lambda ls: [(launch.kernel, launch.grid, launch.meta) for launch in ls]  # noqa: E731
            assert geometry(launches) == geometry(mix.all_launches(B, M, 40, mode, target))
        # the tiled kernels; the preparation and combination kernels are one pass over rows (launch bound)
        tiled = [launch for launch in launches if "BLOCK_B" in launch.meta]
        assert [launch.kernel for launch in tiled] == ["_mixture_fwd_kernel", "_mixture_bwd_z_kernel",
                                                       "_mixture_bwd_m_kernel"]
        assert len(launches) == 10  # prep x 2, fwd, combine | prep x 2, bwd_z, finish, bwd_m, finish
        for launch in tiled:
            assert launch.programs >= least, (launch.kernel, B, M, launch.grid)
            B_pad, M_pad = launch.args[-3], launch.args[-2]
            assert B_pad % launch.meta["BLOCK_B"] == 0 and M_pad % launch.meta["BLOCK_M"] == 0
            assert launch.meta["num_stages"] >= 3 and launch.meta["PRECISION"] == "tf32"
    fused = mix.all_launches(100, 500, 40, mode, target)
    assert [(launch.kernel, launch.grid) for launch in fused] == [("_mixture_fused_fwd_kernel", (7,)),
                                                                  ("_mixture_fused_bwd_kernel", (7 + 16,))]
    assert all(launch.meta["PRECISION"] == "tf32" for launch in fused)


def test_plan_choice_and_override(monkeypatch):
    """Fused while each loop of a fused kernel is at most FUSED_LOOP_TILES tiles (B <= 256, M <= 512), split
    beyond; BYPE_MIXTURE_PLAN forces either and rejects anything else in one line."""
    monkeypatch.delenv(mix.PLAN_ENV, raising=False)
    assert [mix.triton_plan(B, M) for B, M in [(100, 500), (256, 512), (257, 500), (100, 513), (1024, 50000)]] == \
        ["fused", "fused", "split", "split", "split"]
    monkeypatch.setenv(mix.PLAN_ENV, "split")
    assert mix.triton_plan(100, 500) == "split"
    monkeypatch.setenv(mix.PLAN_ENV, "fused")
    assert mix.triton_plan(1024, 50000) == "fused"
    monkeypatch.setenv(mix.PLAN_ENV, "fast")
    with pytest.raises(ValueError, match="BYPE_MIXTURE_PLAN='fast': expected 'auto', 'fused' or 'split'"):
        mix.triton_plan(100, 500)


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


def test_bench_kernels_smoke(tmp_path, capsys):
    """`bype bench kernels` on a tiny sweep writes a table, JSON rows with timings, and a plot."""
    import argparse
    import json
    bench = pytest.importorskip("bype.bench.kernels")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--B", "16", "--M", "20,3000", "--d", "3", "--impls", "naive,chunked,triton",
                              "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--mem-limit-gb", "0.0001",
                              "--device", "cpu", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("| chunked | fwd | 16 | 20 | 3 |") == 1  # each row printed once
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = {(r["impl"], r["passes"], r["M"]): r for r in data["rows"]}
    assert rows[("chunked", "fwdbwd", 20)]["time_s"] > 0
    # back to back and enqueue time: on a CPU the host is the device, so enqueueing is the whole call
    r = rows[("chunked", "fwdbwd", 20)]
    assert 0 < r["enqueue_s"] <= r["b2b_s"]
    assert rows[("naive", "fwd", 20)]["speedup_vs_naive"] == 1.0
    assert "skipped" in rows[("naive", "fwd", 3000)]  # 16 x 3000 x 4 B x 3 > 0.0001 GiB
    assert "triton" in data["meta"]["unavailable"]  # CPU: not timed
    md = (tmp_path / "kernels.md").read_text()
    assert "| chunked | fwd | 16 | 20 | 3 |" in md and "| back to back ms | enqueue ms |" in md
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_bench_kernels_profile(tmp_path):
    """`--profile` records where each row's time goes (CPU: aten operators by own time): the largest first,
    shares of the call's total, the table after the timings in kernels.md."""
    import json

    from bype.cli import main

    assert main(["bench", "kernels", "--device", "cpu", "--impls", "chunked", "--B", "16", "--M", "20", "--d", "3",
                 "--passes", "fwdbwd", "--repeats", "2", "--warmup", "1", "--profile", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    prof = row["profile"]
    us = [p["us"] for p in prof["top"]]
    assert prof["total_us"] > 0 and us == sorted(us, reverse=True) and len(us) <= 12
    assert 0 < sum(p["share"] for p in prof["top"]) <= 1 + 1e-9
    assert any(p["name"].startswith("aten::") and p["launches"] >= 1 for p in prof["top"])
    md = (tmp_path / "kernels.md").read_text()
    assert md.index("| chunked | fwdbwd | 16 | 20 | 3 |") < md.index("## Where the time goes (`--profile`)")
    assert "**chunked fwdbwd B=16 M=20 d=3**" in md


def test_bench_kernels_compile_report(tmp_path):
    """`--compile-report sm_90` compiles the launchers' calls offline (no GPU) and reads the cubin:
    zero spills and the launch's program count in the JSON records."""
    import json
    import subprocess
    import sys
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    subprocess.run([sys.executable, "-m", "bype.cli", "bench", "kernels", "--compile-report", "sm_90", "--B", "100",
                    "--M", "500", "--d", "40", "--log-var", "diag", "--json", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    records = json.loads(out.read_text())
    # (100, 500) runs the fused plan: one kernel per pass; the coreset kernels beside them
    assert {r["kernel"] for r in records} == {"mixture_fused_fwd", "mixture_fused_bwd", "logistic_pairwise",
                                              "logistic_grad"}
    keys = {"kernel", "arch", "B", "M", "d", "log_var", "regs", "spill_bytes", "shared_bytes", "programs",
            "resident", "waves"}
    for r in records:
        assert set(r) == keys and r["arch"] == "sm_90" and (r["B"], r["M"]) == (100, 500)
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] == 0, r
    target = tiling.cuda_target(90)
    expected = {launch.kernel.strip("_").removesuffix("_kernel"): launch.programs
                for launch in mix.all_launches(100, 500, 40, "diag", target)}
    assert expected == {"mixture_fused_fwd": 7, "mixture_fused_bwd": 23}
    for r in records:
        if r["kernel"] in expected:
            assert r["programs"] == expected[r["kernel"]] and r["log_var"] == "diag"


@pytest.mark.parametrize("mode", ["shared", "diag"])
def test_triton_call_is_a_few_launches(mode, monkeypatch):
    """At the training shape a call is launch bound: forward + backward on the Triton path is the two fused
    kernels and at most one aten operator that launches (a shared log-variance's sum); forced to the split plan,
    the 10 Triton kernels (preparation x 2, forward, combine | preparation x 2, two backwards, two finishes) and
    at most 4 aten operators; the torch operators of the host code before either were 112-129."""
    from bype.bench._kernel_launches import host_cost

    monkeypatch.delenv(mix.PLAN_ENV, raising=False)
    cost = host_cost("triton", 100, 500, 40, mode, repeats=1)
    assert cost["triton_launches"] == 2
    assert cost["aten_launches"] <= (1 if mode == "shared" else 0), cost["ops"]
    monkeypatch.setenv(mix.PLAN_ENV, "split")
    cost = host_cost("triton", 100, 500, 40, mode, repeats=1)
    assert cost["triton_launches"] == 10
    assert cost["aten_launches"] <= 4, cost["ops"]


@pytest.mark.parametrize("arch", [80, 90])
def test_resident_table_matches_compiled_kernels(arch):
    """The split count trusts RESIDENT (programs per SM at once): recompute it from the registers and
    shared memory of freshly compiled kernels at a large shape, d = 40 isotropic (48 columns: 32 + 16),
    both archs. The table never states more than the binary allows and is at most one below (it keeps
    the smaller of two Triton versions' counts)."""
    import json
    import subprocess
    import sys
    pytest.importorskip("triton")
    out = f"{os.environ.get('TMPDIR', '/tmp')}/bype-resident-sm{arch}-{os.getpid()}.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    subprocess.run([sys.executable, "-m", "bype.cli", "bench", "kernels", "--compile-report", f"sm_{arch}", "--B",
                    "1024", "--M", "50000", "--d", "40", "--log-var", "shared", "--json", out], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
        records = [r for r in json.load(f) if r["kernel"] in ("mixture_fwd", "mixture_bwd_z", "mixture_bwd_m")]
    os.remove(out)
    assert len(records) == 3
    for r in records:
        computed = tiling.resident_programs(arch, 4, r["regs"], r["shared_bytes"])
        table = mix.resident_programs(r["kernel"].split("_", 1)[1], 1024, 50000, 48, tiling.cuda_target(arch))
        assert computed == r["resident"] and computed - 1 <= table <= computed, (r, table)


def test_split_fills_whole_waves():
    """With the programs per SM known, the split count minimises waves x tiles per split (the makespan),
    among the splits that keep >= 264 programs and at most MAX_WAVES waves: exhaustively the best, and never worse than the rule
    that only counts programs (272 programs on 264 slots: two waves, the second almost empty)."""
    target = tiling.cuda_target(90)
    for loop_tiles, other, resident in [(782, 16, 1), (782, 16, 2), (782, 4, 2), (1563, 16, 2), (16, 4, 4),
                                        (16, 3125, 2), (97, 7, 3)]:
        slots = target.sms * resident
        splits, per = tiling.split(loop_tiles, other, target, resident)
        assert (splits - 1) * per < loop_tiles <= splits * per  # every split non-empty, all tiles covered
        makespan = tiling.cdiv(other * splits, slots) * per
        floor = min(tiling.MIN_PROGRAMS, other * loop_tiles)
        cap = max(other, tiling.MAX_WAVES * max(slots, floor))  # more splits only add partial sums
        best = min(tiling.cdiv(other * tiling.cdiv(loop_tiles, p), slots) * p
                   for p in range(1, loop_tiles + 1) if floor <= other * tiling.cdiv(loop_tiles, p) <= cap)
        assert makespan == best, (loop_tiles, other, resident, splits, per)
        assert other * splits >= floor
        old_splits, old_per = tiling.split(loop_tiles, other, target)
        assert makespan <= tiling.cdiv(other * old_splits, slots) * old_per
    assert tiling.split(782, 16, target, 2) == (33, 24)  # 528 programs: exactly 2 waves of 264


def test_bench_kernels_launches_cli(tmp_path, capsys):
    """`bype bench kernels --launches` prints the table and writes one record per (log_var, impl)."""
    import json

    from bype.cli import main

    out = tmp_path / "launches.json"
    assert main(["bench", "kernels", "--launches", "--B", "37", "--M", "53", "--d", "7", "--log-var", "diag",
                 "--json", str(out)]) == 0
    assert "| impl | B | M | d | log_var | aten launches |" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["log_var"], r["B"]) for r in rows] == [("torch", "diag", 37), ("triton", "diag", 37)]
    assert rows[1]["triton_launches"] == 2 and rows[1]["launches"] < rows[0]["launches"]  # the fused plan


def test_sizes_beyond_32_bit_offsets_take_the_torch_path(monkeypatch):
    """The kernels index operands with int32 offsets: a size whose padded rows x columns would reach 2^31
    is refused by impl='triton' (one line) and sent to the torch path by 'auto'. Checked on meta tensors,
    with the limit lowered so that a small call crosses it."""
    monkeypatch.setattr(mix, "MAX_OFFSET", 64 * (mix.MAX_PAD_ROWS + 100))
    z, means = torch.empty(100, 40, device="meta"), torch.empty(30, 40, device="meta")
    args = (z, means, torch.empty(30, device="meta"), torch.empty((), device="meta"))
    assert mix._triton_unsupported(*args) == ""  # 48 columns
    z = torch.empty(100, 64, device="meta")
    means = torch.empty(30, 64, device="meta")
    why = mix._triton_unsupported(z, means, args[2], args[3])
    assert "32-bit offsets" in why and "z shape (100, 64)" in why
