"""Pure-torch mixture-of-Gaussians log-density: naive references and the chunked path.

Definition (shared by every implementation in this package)::

    out[b] = LSE_m( log_weights[m] + log N(z[b]; means[m], diag(exp(log_var[m]))) )

with ``log_var`` a 0-dim scalar (shared isotropic), ``[M]`` (per-component isotropic) or
``[M, d]`` (diagonal). The Gaussian normalising constant is included.

* :func:`mixture_logpdf_naive` - direct differences ``z - m``, autograd; materialises
  ``B x M x d``. The ground truth for tests (run it in float64).
* :func:`mixture_logpdf_cdist` - ``torch.cdist`` + ``logsumexp``, the "obvious" eager
  baseline for the benchmark (isotropic only).
* :func:`chunked_forward` / :func:`chunked_backward` - memory-bounded torch path. Works on
  tiles of ``chunk`` components; the backward recomputes responsibilities tile by tile, so
  nothing of size ``B x M`` is ever kept (flash-attention style, same maths as the Triton
  kernels in :mod:`kernels.mixture`).

Numerics: squared distances use the dot-product form ``|z|^2 + |m|^2 - 2 z.m`` (one matmul),
which cancels catastrophically in fp32 when ``z`` and the means sit far from the origin. Both
inputs are therefore shifted by a common point (the mean of the means, detached) first; the
density is shift invariant, so gradients are unchanged. The remaining absolute error of a
squared distance is about ``eps * |x - shift|^2``: exact enough when components cluster (the
test uses a 1e3 offset with unit spread), see docs/KERNELS.md for the limits.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)

# Target number of elements of one [B, chunk] tile (fp32: 16 MiB); matmuls stay efficient.
_TILE_ELEMS = 1 << 22


def log_var_mode(log_var: Tensor) -> str:
    """'shared' (0-dim), 'component' ([M]) or 'diag' ([M, d]); shapes checked by the caller."""
    return ("shared", "component", "diag")[log_var.dim()]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast: exp/log need it)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def auto_chunk(B: int, M: int) -> int:
    return int(max(1, min(M, _TILE_ELEMS // max(B, 1))))


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------
def mixture_logpdf_naive(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor) -> Tensor:
    """Direct computation with explicit differences; memory B*M*d. For tests (float64)."""
    d = z.shape[-1]
    diff = z[:, None, :] - means[None, :, :]  # [B, M, d]
    if log_var.dim() == 2:
        logn = -0.5 * (LOG_2PI * d + log_var.sum(-1)) - 0.5 * (diff.square() * torch.exp(-log_var)).sum(-1)
    else:
        lv = log_var.expand(means.shape[0])
        logn = -0.5 * d * (LOG_2PI + lv) - 0.5 * diff.square().sum(-1) * torch.exp(-lv)
    return torch.logsumexp(log_weights + logn, dim=1)


def mixture_logpdf_cdist(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor) -> Tensor:
    """cdist + logsumexp baseline (isotropic log_var only). Keeps B x M alive for autograd."""
    if log_var.dim() == 2:
        raise ValueError(f"mixture_logpdf_cdist: log_var must be 0-dim or [M], got {tuple(log_var.shape)}")
    d = z.shape[-1]
    lv = log_var.expand(means.shape[0])
    d2 = torch.cdist(z, means).square()
    logn = -0.5 * d * (LOG_2PI + lv) - 0.5 * d2 * torch.exp(-lv)
    return torch.logsumexp(log_weights + logn, dim=1)


# ----------------------------------------------------------------------------------------
# Chunked torch path (forward + analytic backward)
# ----------------------------------------------------------------------------------------
def _prepare(z, means, log_weights, log_var):
    ct = compute_dtype(z, means, log_weights, log_var)
    means_c = means.detach().to(ct)
    shift = means_c.mean(0)  # common centre; detached (density is shift invariant)
    zc = z.detach().to(ct) - shift
    mc = means_c - shift
    return zc, mc, log_weights.detach().to(ct), log_var.detach().to(ct)


def _augment(zc, mode):
    """Rows [zc, 1, |zc|^2] (isotropic) or [zc^2, zc, 1] (diag): with the matching component
    rows of :func:`_component_rows`, one matmul gives the scores of a whole tile."""
    ones = torch.ones_like(zc[:, :1])
    if mode == "diag":
        return torch.cat([zc * zc, zc, ones], 1)
    return torch.cat([zc, ones, (zc * zc).sum(1, keepdim=True)], 1)


def _component_rows(mc_j, lw_j, lv_j, mode):
    """Per-component rows so that ``augment(z) @ rows.T = log w_m + log N(z; m_m)``:

    isotropic ``s = z.(p m) + (c - p |m|^2 / 2) - (p / 2) |z|^2``;
    diag      ``s = z^2.(-P / 2) + z.(P m) + (c - sum(P m^2) / 2)``; c = log w - normaliser.
    Also returns the precision p ([m] or [m, d])."""
    m, d = mc_j.shape
    if mode == "diag":
        p = torch.exp(-lv_j)
        pm = p * mc_j
        c = lw_j - 0.5 * (LOG_2PI * d + lv_j.sum(1)) - 0.5 * (pm * mc_j).sum(1)
        return torch.cat([-0.5 * p, pm, c[:, None]], 1), p
    p = torch.exp(-lv_j).expand(m)
    c = lw_j - 0.5 * d * (LOG_2PI + lv_j) - 0.5 * p * (mc_j * mc_j).sum(1)
    return torch.cat([p[:, None] * mc_j, c[:, None], -0.5 * p[:, None]], 1), p


def chunked_forward(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor, chunk: int = 0) -> Tensor:
    """Memory O(B * chunk): running log-sum-exp over tiles of components, one matmul per tile.
    Returns [B] in the compute dtype (float32, or float64 if any input is float64)."""
    B, M = z.shape[0], means.shape[0]
    mode = log_var_mode(log_var)
    chunk = chunk if chunk > 0 else auto_chunk(B, M)
    zc, mc, lw, lv = _prepare(z, means, log_weights, log_var)
    za = _augment(zc, mode)
    out = None
    for j in range(0, M, chunk):
        sl = slice(j, j + chunk)
        rows, _ = _component_rows(mc[sl], lw[sl], lv if mode == "shared" else lv[sl], mode)
        lse = torch.logsumexp(za @ rows.T, dim=1)
        out = lse if out is None else torch.logaddexp(out, lse)
    return out


def chunked_backward(grad: Tensor, z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor,
                     out: Tensor, chunk: int = 0):
    """Gradients (dz, dmeans, dlog_weights, dlog_var) given the upstream grad [B] and the
    forward log-sum-exp [B]; recomputes responsibilities tile by tile (three matmuls and one
    exp per tile). Returned in the input dtypes.

    With G[b, m] = grad_b * responsibility_bm, T = G^T z, cs = sum_b G (all centred):
      dz_b   = sum_m G p_m (m_m - z_b)        (diag: sum_m G (P m)_m - z_b * sum_m G P_m)
      dm_m   = p_m (T_m - cs_m m_m)           dlog_w = cs
      dlv_m  = -d/2 cs + p_m/2 sum_b G |z_b - m_m|^2   (diag: per coordinate)
    """
    B, d = z.shape
    M = means.shape[0]
    mode = log_var_mode(log_var)
    chunk = chunk if chunk > 0 else auto_chunk(B, M)
    zc, mc, lw, lv = _prepare(z, means, log_weights, log_var)
    ct = zc.dtype
    g = grad.detach().to(ct)
    lse = out.detach().to(ct)
    # Rows whose density is exactly 0 (all weights -inf) get no gradient instead of NaN;
    # NaN rows stay NaN so that bad inputs show.
    ok = lse != -float("inf")
    g = torch.where(ok, g, torch.zeros_like(g))[:, None]
    lse = torch.where(ok, lse, torch.zeros_like(lse))[:, None]
    za = _augment(zc, mode)

    gz = torch.zeros_like(zc)
    gm = torch.empty_like(mc)
    glw = torch.empty_like(lw)
    glv = torch.empty((M, d) if mode == "diag" else (M,), dtype=ct, device=zc.device)
    for j in range(0, M, chunk):
        sl = slice(j, j + chunk)
        mc_j = mc[sl]
        rows, p = _component_rows(mc_j, lw[sl], lv if mode == "shared" else lv[sl], mode)
        G = (za @ rows.T).sub_(lse).exp_().mul_(g)  # [B, m], in place: one tile alive
        X = G.T @ za  # [m, K]: sums over b of G times each augmented column
        if mode == "diag":
            T2, T, cs = X[:, :d], X[:, d:2 * d], X[:, 2 * d]
            Y = G @ torch.cat([p * mc_j, p], 1)  # [B, 2d]
            gz += Y[:, :d] - zc * Y[:, d:]
            gm[sl] = p * (T - cs[:, None] * mc_j)
            sq = T2 - 2.0 * mc_j * T + mc_j * mc_j * cs[:, None]  # sum_b G (z_bk - m_mk)^2
            glv[sl] = -0.5 * cs[:, None] + 0.5 * p * sq
        else:
            T, cs, gzz = X[:, :d], X[:, d], X[:, d + 1]
            Y = G @ torch.cat([p[:, None] * mc_j, p[:, None]], 1)  # [B, d + 1]
            gz += Y[:, :d] - Y[:, d:] * zc
            gm[sl] = p[:, None] * (T - cs[:, None] * mc_j)
            sq = gzz + cs * (mc_j * mc_j).sum(1) - 2.0 * (T * mc_j).sum(1)  # sum_b G |z_b - m_m|^2
            glv[sl] = -0.5 * d * cs + 0.5 * p * sq
        glw[sl] = cs
    if mode == "shared":
        glv = glv.sum()
    return (gz.to(z.dtype), gm.to(means.dtype), glw.to(log_weights.dtype), glv.to(log_var.dtype))
