"""Fused pseudocoreset gradients of KL(pi_Uw || pi_X) (DESIGN section 2).

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
from .dispatch import resolve_impl

_CHUNK_ELEMS = 1 << 22  # torch path: elements of one [m, S, D] chunk

# (BLOCK_N, BLOCK_S, BLOCK_D) for the pairwise pass and (BLOCK_N, BLOCK_S, BLOCK_D) for the
# gradient pass. The interpreter's cost is per program instance: big tiles on CPU.
CPU_BLOCKS = ((32, 32, 32), (32, 32, 32))
CUDA_BLOCKS = ((32, 32, 8), (32, 8, 32))


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


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


def _logistic_host_consts(mean: Tensor, log_scale: Tensor):
    mean = mean.float().contiguous()
    inv = torch.exp(-log_scale.float()).contiguous()
    mid = torch.log(-torch.expm1(-2.0 * ref.HALF_BIN * inv)).contiguous()
    return mean, inv, mid


def _logistic_pairwise_triton(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    n, D = x.shape
    S = mean.shape[0]
    x = x.float().contiguous()
    mean, inv, mid = _logistic_host_consts(mean, log_scale)
    out = torch.empty(n, S, dtype=torch.float32, device=x.device)
    if n == 0 or S == 0:
        return out
    bn, bs, bd = (CPU_BLOCKS if x.device.type == "cpu" else CUDA_BLOCKS)[0]
    _triton_module(x.device)._logistic_pairwise_kernel[(_cdiv(n, bn), _cdiv(S, bs))](
        x, mean, inv, mid, out, n, S, D, x.stride(0), mean.stride(0), out.stride(0),
        BLOCK_N=bn, BLOCK_S=bs, BLOCK_D=bd)
    return out


def _logistic_grad_triton(x: Tensor, mean: Tensor, log_scale: Tensor, r: Tensor) -> Tensor:
    n, D = x.shape
    S = mean.shape[0]
    x = x.float().contiguous()
    mean, inv, _ = _logistic_host_consts(mean, log_scale)
    r = r.float().contiguous()
    out = torch.zeros(n, D, dtype=torch.float32, device=x.device)
    if n == 0 or S == 0:
        return out
    bn, bs, bd = (CPU_BLOCKS if x.device.type == "cpu" else CUDA_BLOCKS)[1]
    _triton_module(x.device)._logistic_grad_kernel[(_cdiv(n, bn), _cdiv(D, bd))](
        x, mean, inv, r, out, n, S, D, x.stride(0), mean.stride(0),
        BLOCK_N=bn, BLOCK_S=bs, BLOCK_D=bd)
    return out


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
    impl = resolve_impl(x, impl)
    if impl == "triton":
        return _logistic_pairwise_triton(x, params[:, 0], params[:, 1])
    ct = torch.float64 if torch.float64 in (x.dtype, params.dtype) else torch.float32
    return _logistic_pairwise_torch(x.to(ct), params[:, 0].to(ct), params[:, 1].to(ct))


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
    if impl == "triton":
        A = _logistic_pairwise_triton(U, mean, log_scale)
    else:
        ct = torch.float64 if torch.float64 in (U.dtype, params.dtype) else torch.float32
        A = _logistic_pairwise_torch(U.to(ct), mean.to(ct), log_scale.to(ct))
    A = A.to(f64)  # [M, S]
    R = data_term.to(f64) - w64 @ A
    R_c = R - R.mean()
    grad_w = -scale * (A @ R_c)
    if impl == "triton":
        GR = _logistic_grad_triton(U, mean, log_scale, R_c)
    else:
        GR = _logistic_grad_torch(U.to(ct), mean.to(ct), log_scale.to(ct), R_c.to(ct))
    grad_U = -scale * w64[:, None] * GR.to(f64)
    return grad_U.to(U.dtype), grad_w.to(w.dtype), R_c
