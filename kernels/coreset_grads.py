"""Fused pseudocoreset gradients of KL(pi_Uw || pi_X) (eq. 18-19 of the ByPE-VAE paper).

Given pseudodata ``U [M, D]``, weights ``w [M]``, decoder parameters ``params [S, P, D]`` at
samples ``z_1..z_S`` and the data term ``data_term[s] = sum_n log p(x_n | z_s)``::

    A[m, s] = f(u_m, z_s)            R[s] = data_term[s] - sum_m w_m A[m, s]
    grad_w   = -(1/(S-1)) A~ R~        grad_U[m] = -w_m (1/(S-1)) sum_s grad_u f(u_m, z_s) R~_s

(``~``: centred over s). Because ``R~`` sums to zero, ``A~ R~ = A R~``: A needs no centring.

* ``bernoulli``: ``f = u . l_s - sum_d softplus(l_sd)`` is bilinear, so nothing of size
  ``M x S`` is needed: ``w A = (U^T w) . l_s - sum(w) sp_s``, ``A R~ = U (L^T R~) - (sp . R~)``
  and ``grad_U = -(1/(S-1)) w (L^T R~)^T`` (rank one). Matrix-vector products only:
  O((M + S) D) time and memory on every device, so both impls run the same code.
* ``logistic``: no factorisation; pass 1 builds ``A [M, S]`` (sum over pixels inside the
  kernel), pass 2 reduces ``grad_u f * R~`` over samples. ``M x S x D`` is never stored (Triton:
  register tiles; torch: chunks of pseudodata).

Residual arithmetic (over S) runs in float64: ``data_term`` is a sum over the whole training
set (~1e6 nats) whose spread over samples is what matters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import coreset_reference as ref
from . import tiling
from .dispatch import chosen_by_auto, resolve_impl, with_fallback

OP = "coreset_grads"

_CHUNK_ELEMS = 1 << 22  # torch path: elements of one [m, S, D] chunk
_LOG2E = 1.4426950408889634

# (BLOCK_N, BLOCK_S, BLOCK_D, num_warps) of the pairwise pass and of the gradient pass. The
# interpreter's cost is per program instance: big tiles on CPU. On CUDA the [N, S, D] register
# tile holds 32 (pairwise, 8 warps) or 64 (gradient, 4 warps) elements per thread, so every
# temporary of the loop body stays in registers: 64 / 127 registers, no spills on sm_80 or
# sm_90 (`bype bench kernels --compile-report`; 8-wide pixel rows load as 32-byte vectors).
CPU_BLOCKS = ((32, 32, 32, 1), (32, 32, 32, 1))
CUDA_BLOCKS = ((32, 32, 8, 8), (32, 8, 32, 4))
NUM_STAGES = 3  # small tiles: three stages always fit shared memory


def _triton_module(device: torch.device):
    from . import coreset_triton as ct
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(ct._logistic_pairwise_kernel, InterpretedFunction):
            raise RuntimeError("impl='triton' on CPU: triton was imported before TRITON_INTERPRET=1 was set; "
                               "set it before the first import of triton (or use impl='torch')")
    return ct


def _check_params(params: Tensor, likelihood: str, D: int, fn: str) -> None:
    if likelihood not in ref.LIKELIHOODS:
        raise ValueError(f"{fn}: likelihood must be one of {sorted(ref.LIKELIHOODS)}, got {likelihood!r}")
    P = ref.LIKELIHOODS[likelihood]
    if params.dim() != 3 or params.shape[1] != P or params.shape[2] != D:
        raise ValueError(f"{fn}: params must be [S, {P}, D={D}] for {likelihood}, got shape {tuple(params.shape)}")


# ----------------------------------------------------------------------------------------
# Discretised logistic: pairwise log-likelihood and gradient reduction
# ----------------------------------------------------------------------------------------
def _logistic_pairwise_torch(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    n, D = x.shape
    S = mean.shape[0]
    out = x.new_empty(n, S)
    step = max(1, _CHUNK_ELEMS // max(S * D, 1))
    for i in range(0, n, step):
        out[i:i + step] = ref.logistic_log_pmf(x[i:i + step, None, :], mean[None], log_scale[None]).sum(-1)
    return out


def _logistic_grad_torch(x: Tensor, mean: Tensor, log_scale: Tensor, r: Tensor) -> Tensor:
    n, D = x.shape
    S = mean.shape[0]
    out = torch.empty_like(x)
    step = max(1, _CHUNK_ELEMS // max(S * D, 1))
    for i in range(0, n, step):
        g = ref.logistic_dlog_pmf_dx(x[i:i + step, None, :], mean[None], log_scale[None])  # [m, S, D]
        out[i:i + step] = torch.einsum("msd,s->md", g, r)
    return out


def _blocks(which: int, target: tiling.Target):
    return (CUDA_BLOCKS if target.cuda else CPU_BLOCKS)[which]


def _pad_to(t: Tensor, rows: int, cols: int, value: float) -> Tensor:
    """t [r, c] -> [rows, cols], new entries = value (contiguous fp32)."""
    t = t.float()
    if tuple(t.shape) == (rows, cols):
        return t.contiguous()
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value).contiguous()


def pairwise_launch(x: Tensor, mean: Tensor, log_scale: Tensor, target: tiling.Target):
    """The pairwise kernel call and its output buffer [N_pad, S_pad] (rows padded to the tiles)."""
    n, D = x.shape
    S = mean.shape[0]
    bn, bs, bd, warps = _blocks(0, target)
    n_pad, s_pad = tiling.cdiv(n, bn) * bn, tiling.cdiv(S, bs) * bs
    inv = torch.exp(-log_scale.float())
    mid2 = torch.log2(-torch.expm1(-2.0 * ref.HALF_BIN * inv))
    out = x.new_empty(n_pad, s_pad, dtype=torch.float32)
    args = (_pad_to(x, n_pad, D, 0.5), _pad_to(mean, s_pad, D, 0.5), _pad_to(_LOG2E * inv, s_pad, D, 0.0),
            _pad_to(mid2, s_pad, D, 2.0), out, s_pad, D)
    meta = dict(BLOCK_N=bn, BLOCK_S=bs, BLOCK_D=bd, EVEN_D=D % bd == 0, num_warps=warps, num_stages=NUM_STAGES)
    return tiling.Launch("_logistic_pairwise_kernel", (n_pad // bn, s_pad // bs), args, meta), out


def grad_launch(x: Tensor, mean: Tensor, log_scale: Tensor, r: Tensor, target: tiling.Target):
    """The gradient kernel call and its partial outputs [splits, N_pad, D_pad] (summed by the caller)."""
    n, D = x.shape
    S = mean.shape[0]
    bn, bs, bd, warps = _blocks(1, target)
    n_pad, s_pad, d_pad = tiling.cdiv(n, bn) * bn, tiling.cdiv(S, bs) * bs, tiling.cdiv(D, bd) * bd
    grid_nd = (n_pad // bn) * (d_pad // bd)
    splits, per = tiling.split(s_pad // bs, grid_nd, target)
    inv2 = _LOG2E * torch.exp(-log_scale.float())
    out = x.new_empty(splits, n_pad, d_pad, dtype=torch.float32)
    args = (_pad_to(x, n_pad, d_pad, 0.5), _pad_to(mean, s_pad, d_pad, 0.0), _pad_to(inv2, s_pad, d_pad, 0.0),
            _pad_to(r[:, None], s_pad, 1, 0.0).view(-1), out, n_pad, d_pad, per, s_pad)
    meta = dict(BLOCK_N=bn, BLOCK_S=bs, BLOCK_D=bd, num_warps=warps, num_stages=NUM_STAGES)
    return tiling.Launch("_logistic_grad_kernel", (n_pad // bn, d_pad // bd, splits), args, meta), out


def all_launches(n: int, S: int, D: int, target: tiling.Target) -> list[tiling.Launch]:
    """Both logistic kernel calls at these sizes on the meta device (offline compile report)."""
    dev = torch.device("meta")
    x, mean = torch.empty(n, D, device=dev), torch.empty(S, D, device=dev)
    return [pairwise_launch(x, mean, mean, target)[0],
            grad_launch(x, mean, mean, torch.empty(S, device=dev), target)[0]]


def _run(launch: tiling.Launch, device: torch.device) -> None:
    getattr(_triton_module(device), launch.kernel)[launch.grid](*launch.args, **launch.meta)


def _logistic_pairwise_triton(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    n, S = x.shape[0], mean.shape[0]
    if n == 0 or S == 0:
        return torch.empty(n, S, dtype=torch.float32, device=x.device)
    launch, out = pairwise_launch(x, mean, log_scale, tiling.target_for(x.device))
    _run(launch, x.device)
    return out[:n, :S]


def _logistic_grad_triton(x: Tensor, mean: Tensor, log_scale: Tensor, r: Tensor) -> Tensor:
    n, D = x.shape
    if n == 0 or mean.shape[0] == 0:
        return torch.zeros(n, D, dtype=torch.float32, device=x.device)
    launch, out = grad_launch(x, mean, log_scale, r, tiling.target_for(x.device))
    _run(launch, x.device)
    return out.sum(0)[:n, :D]


def _either(impl: str, auto: bool, triton_call, torch_call):
    """One pass on the chosen path; a Triton failure of an automatic choice falls back (kernels/dispatch.py)."""
    return with_fallback(OP, auto, triton_call, torch_call) if impl == "triton" else torch_call()


def pairwise_log_prob(x: Tensor, params: Tensor, likelihood: str, impl: str = "auto") -> Tensor:
    """``out[n, s] = sum_d log p(x_nd | params[s, :, d])`` without materialising n x S x D.

    Args:
        x: [n, D] data in [0, 1] (grey levels for the logistic likelihood).
        params: [S, P, D]: logits (P=1, bernoulli) or (mean, log_scale) (P=2, logistic).
        likelihood: "bernoulli" | "logistic".
    Returns [n, S] (float32, or float64 on the torch path with float64 inputs). No autograd.
    """
    if x.dim() != 2:
        raise ValueError(f"pairwise_log_prob: x must be [n, D], got shape {tuple(x.shape)}")
    _check_params(params, likelihood, x.shape[1], "pairwise_log_prob")
    x, params = x.detach(), params.detach()
    if likelihood == "bernoulli":
        logits = params[:, 0, :]
        return x @ logits.T - F.softplus(logits).sum(1)[None, :]
    auto = chosen_by_auto(impl)
    ct = torch.float64 if torch.float64 in (x.dtype, params.dtype) else torch.float32

    def torch_path():
        return _logistic_pairwise_torch(x.to(ct), params[:, 0].to(ct), params[:, 1].to(ct))

    return _either(resolve_impl(x, impl), auto, lambda: _logistic_pairwise_triton(x, params[:, 0], params[:, 1]),
                   torch_path)


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------
def coreset_grads(U: Tensor, w: Tensor, params: Tensor, data_term: Tensor, likelihood: str,
                  impl: str = "auto"):
    """Monte Carlo gradients of KL(pi_Uw || pi_X) w.r.t. the pseudodata and the weights.

    Args:
        U: [M, D] pseudodata in [0, 1].
        w: [M] weights.
        params: [S, P, D] decoder parameters at the samples z_s (see :func:`pairwise_log_prob`).
        data_term: [S] ``sum_n log p(x_n | z_s)`` over the whole data set.
        likelihood: "bernoulli" | "logistic".
        impl: "auto" | "torch" | "triton" (only the logistic likelihood has Triton kernels).
    Returns:
        (grad_U [M, D] in U's dtype, grad_w [M] in w's dtype, residual_centered [S] float64).
        No autograd: these are the gradients, used by the coreset optimiser directly.
    """
    if U.dim() != 2:
        raise ValueError(f"coreset_grads: U must be [M, D], got shape {tuple(U.shape)}")
    M, D = U.shape
    if tuple(w.shape) != (M,):
        raise ValueError(f"coreset_grads: w must be [M={M}], got shape {tuple(w.shape)}")
    _check_params(params, likelihood, D, "coreset_grads")
    S = params.shape[0]
    if tuple(data_term.shape) != (S,):
        raise ValueError(f"coreset_grads: data_term must be [S={S}], got shape {tuple(data_term.shape)}")
    if S < 2:
        raise ValueError(f"coreset_grads: need at least 2 samples for a covariance, got params shape {tuple(params.shape)}")
    for name, t in (("w", w), ("params", params), ("data_term", data_term)):
        if t.device != U.device:
            raise ValueError(f"coreset_grads: {name} is on {t.device}, U on {U.device}")
    U, w, params, data_term = U.detach(), w.detach(), params.detach(), data_term.detach()
    auto = chosen_by_auto(impl)
    impl = resolve_impl(U, impl)
    f64 = torch.float64
    w64 = w.to(f64)
    scale = 1.0 / (S - 1)

    if likelihood == "bernoulli":
        # Bilinear in u: the whole estimator is matrix-vector products (see module docstring).
        L = params[:, 0, :].to(f64)  # [S, D]
        sp = F.softplus(L).sum(1)  # [S]
        wA = L @ (U.to(f64).T @ w64) - w64.sum() * sp  # sum_m w_m A[m, s]
        R = data_term.to(f64) - wA
        R_c = R - R.mean()
        LR = L.T @ R_c  # sum_s l_s R~_s, [D]
        grad_w = -scale * (U.to(f64) @ LR - sp @ R_c)
        grad_U = -scale * w64[:, None] * LR[None, :]
        return grad_U.to(U.dtype), grad_w.to(w.dtype), R_c

    mean, log_scale = params[:, 0, :], params[:, 1, :]
    ct = torch.float64 if torch.float64 in (U.dtype, params.dtype) else torch.float32
    A = _either(impl, auto, lambda: _logistic_pairwise_triton(U, mean, log_scale),
                lambda: _logistic_pairwise_torch(U.to(ct), mean.to(ct), log_scale.to(ct))).to(f64)  # [M, S]
    R = data_term.to(f64) - w64 @ A
    R_c = R - R.mean()
    grad_w = -scale * (A @ R_c)
    GR = _either(impl, auto, lambda: _logistic_grad_triton(U, mean, log_scale, R_c),
                 lambda: _logistic_grad_torch(U.to(ct), mean.to(ct), log_scale.to(ct), R_c.to(ct)))
    grad_U = -scale * w64[:, None] * GR.to(f64)
    return grad_U.to(U.dtype), grad_w.to(w.dtype), R_c
