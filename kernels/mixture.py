"""Mixture-of-Gaussians log-density: launchers, custom op + autograd, public entry point.

    out[b] = LSE_m( log_weights[m] + log N(z[b]; means[m], diag(exp(log_var[m]))) )

Layout of this file (Liger-Kernel style):

0. Triton kernels: in :mod:`kernels.mixture_triton`, imported on first use only (Triton
   fixes compile-vs-interpret at its own import, so ``import kernels`` must not import it).
1. Launchers (host-side precomputation of per-component constants, grids, interpreter).
2. ``torch.library`` custom ops ``bype_kernels::mixture_logpdf`` (+ ``_backward``) with a fake
   (meta) implementation and ``register_autograd``, so the op works inside ``torch.compile``.
3. :func:`mixture_logpdf`, the public entry point (shape checks, impl resolution).

The torch path (``impl="torch"``) lives in :mod:`kernels.mixture_reference` and runs the
same maths with torch matmuls on tiles of components.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from . import mixture_reference as ref
from .dispatch import resolve_impl


LOG_2PI = ref.LOG_2PI
MAX_TRITON_D = 128  # whole feature dimension lives in one tile (shared memory bound)

# ========================================================================================
# 1. Launchers (triton imported lazily, see kernels/mixture_triton.py)
# ========================================================================================
def _triton_module(device: torch.device):
    """Import the kernels on first use. CPU tensors need them decorated in interpreter mode,
    which Triton decides when it is first imported."""
    from . import mixture_triton as mt
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(mt._mixture_fwd_kernel, InterpretedFunction):
            raise RuntimeError("impl='triton' on CPU: triton was imported before TRITON_INTERPRET=1 was set; "
                               "set it before the first import of triton (or use impl='torch')")
    return mt


# (BLOCK_B, BLOCK_M) under the interpreter, whose cost is per program instance: big tiles.
# Tests lower it to exercise several tiles and masked edges on small shapes.
CPU_BLOCKS = (64, 64)


def _blocks(B: int, M: int, d: int, device: torch.device):
    """(BLOCK_B, BLOCK_M, BLOCK_D, num_stages). CUDA tiles keep every kernel <= 128 KiB of
    shared memory on sm_80 and sm_90 with 3xTF32 dots (checked by compiling for both)."""
    block_d = max(16, 1 << max(0, (d - 1).bit_length()))  # tl.dot needs every dim >= 16
    if device.type == "cpu":
        return CPU_BLOCKS[0], CPU_BLOCKS[1], block_d, 1
    if block_d <= 64:
        return 64, 64, block_d, 2
    return 64, 32, block_d, 2


def _blocks_diag(B: int, M: int, d: int, device: torch.device):
    bb, bm, bd, st = _blocks(B, M, d, device)
    if device.type == "cpu":
        return bb, bm, bd, st
    # two [BLOCK_M, BLOCK_D] operands per step: halve the component tile
    return (64, 32, bd, st) if bd <= 64 else (32, 32, bd, st)


def _precision(device: torch.device) -> str:
    # Plain TF32 (10-bit mantissa) would ruin the distances; 3xTF32 keeps ~fp32 accuracy on
    # tensor cores. The interpreter computes in fp32 whatever is asked.
    return "tf32x3" if (device.type == "cuda" and torch.version.hip is None) else "ieee"


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _triton_prepare(z, means, log_weights, log_var):
    """Centre inputs (fp32, contiguous) and build the per-component constants the kernels
    read: c (log weight + normaliser), q (|m|^2 or sum P m^2) and p (precision)."""
    zc, mc, lw, lv = ref._prepare(z, means, log_weights, log_var)
    zc, mc, lw, lv = (t.float().contiguous() for t in (zc, mc, lw, lv))
    M, d = mc.shape
    mode = ref.log_var_mode(log_var)
    if mode == "diag":
        p = torch.exp(-lv).contiguous()
        pm = (p * mc).contiguous()
        q = (pm * mc).sum(1).contiguous()
        c = (lw - 0.5 * (LOG_2PI * d + lv.sum(1))).contiguous()
        return zc, pm, mc, c, q, p, mode
    lvm = lv.expand(M)
    p = torch.exp(-lvm).contiguous()
    q = (mc * mc).sum(1).contiguous()
    c = (lw - 0.5 * d * (LOG_2PI + lvm)).contiguous()
    return zc, mc, mc, c, q, p, mode


def triton_forward(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor) -> Tensor:
    """Forward on the Triton path; returns fp32 [B]."""
    B, d = z.shape
    M = means.shape[0]
    zc, mk, mc, c, q, p, mode = _triton_prepare(z, means, log_weights, log_var)
    out = torch.empty(B, dtype=torch.float32, device=z.device)
    if B == 0:
        return out
    bb, bm, bd, st = (_blocks_diag if mode == "diag" else _blocks)(B, M, d, z.device)
    _triton_module(z.device)._mixture_fwd_kernel[(_cdiv(B, bb),)](
        zc, mk, c, q, p, out, B, M, d, zc.stride(0), mk.stride(0),
        DIAG=mode == "diag", BLOCK_B=bb, BLOCK_M=bm, BLOCK_D=bd, PRECISION=_precision(z.device),
        num_stages=st)
    return out


def triton_backward(grad: Tensor, z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor,
                    out: Tensor):
    B, d = z.shape
    M = means.shape[0]
    zc, mk, mc, c, q, p, mode = _triton_prepare(z, means, log_weights, log_var)
    lse = out.detach().float()
    g = grad.detach().float()
    ok = torch.isfinite(lse)  # rows with zero density: no gradient instead of NaN
    g = torch.where(ok, g, torch.zeros_like(g)).contiguous()
    lse = torch.where(ok, lse, torch.zeros_like(lse)).contiguous()
    gz = torch.zeros_like(zc)
    gm = torch.zeros_like(mc)
    gw = torch.zeros(M, dtype=torch.float32, device=z.device)
    glv = torch.zeros((M, d) if mode == "diag" else (M,), dtype=torch.float32, device=z.device)
    if B > 0:
        mt = _triton_module(z.device)
        bb, bm, bd, st = (_blocks_diag if mode == "diag" else _blocks)(B, M, d, z.device)
        meta = dict(DIAG=mode == "diag", BLOCK_B=bb, BLOCK_M=bm, BLOCK_D=bd, PRECISION=_precision(z.device),
                    num_stages=st)
        mt._mixture_bwd_z_kernel[(_cdiv(B, bb),)](
            zc, mk, mc, c, q, p, lse, g, gz, B, M, d, zc.stride(0), mk.stride(0), **meta)
        mt._mixture_bwd_m_kernel[(_cdiv(M, bm),)](
            zc, mk, mc, c, q, p, lse, g, gm, gw, glv, B, M, d, zc.stride(0), mk.stride(0), **meta)
    if mode == "shared":
        glv = glv.sum()
    return (gz.to(z.dtype), gm.to(means.dtype), gw.to(log_weights.dtype), glv.to(log_var.dtype))


# ========================================================================================
# 2. Custom ops (torch.compile sees one opaque node for forward and one for backward)
# ========================================================================================
def _out_dtype(*ts: Tensor) -> torch.dtype:
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


@torch.library.custom_op("bype_kernels::mixture_logpdf", mutates_args=())
def _mixture_logpdf_op(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor,
                       impl: str, chunk: int) -> tuple[Tensor, Tensor]:
    """Returns (out in the promoted input dtype, lse in fp32/fp64). The backward reads lse:
    a bf16-rounded output would shift every responsibility exp(s - out) by up to |out| 2^-9."""
    if impl == "triton":
        lse = triton_forward(z, means, log_weights, log_var)
    else:
        lse = ref.chunked_forward(z, means, log_weights, log_var, chunk)
    return lse.to(_out_dtype(z, means, log_weights, log_var), copy=True), lse


@_mixture_logpdf_op.register_fake
def _(z, means, log_weights, log_var, impl, chunk):
    lse_dtype = ref.compute_dtype(z, means, log_weights, log_var) if impl != "triton" else torch.float32
    return (z.new_empty((z.shape[0],), dtype=_out_dtype(z, means, log_weights, log_var)),
            z.new_empty((z.shape[0],), dtype=lse_dtype))


@torch.library.custom_op("bype_kernels::mixture_logpdf_backward", mutates_args=())
def _mixture_logpdf_backward_op(grad: Tensor, z: Tensor, means: Tensor, log_weights: Tensor,
                                log_var: Tensor, out: Tensor, impl: str, chunk: int
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if impl == "triton":
        return triton_backward(grad, z, means, log_weights, log_var, out)
    return ref.chunked_backward(grad, z, means, log_weights, log_var, out, chunk)


@_mixture_logpdf_backward_op.register_fake
def _(grad, z, means, log_weights, log_var, out, impl, chunk):
    return (torch.empty_like(z), torch.empty_like(means), torch.empty_like(log_weights),
            torch.empty_like(log_var))


def _setup_context(ctx, inputs, output):
    z, means, log_weights, log_var, impl, chunk = inputs
    ctx.save_for_backward(z, means, log_weights, log_var, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.impl = impl
    ctx.chunk = chunk


def _backward(ctx, grad, _grad_lse):
    z, means, log_weights, log_var, out = ctx.saved_tensors
    gz, gm, gw, glv = _mixture_logpdf_backward_op(grad, z, means, log_weights, log_var, out,
                                                  ctx.impl, ctx.chunk)
    need = ctx.needs_input_grad
    return (gz if need[0] else None, gm if need[1] else None, gw if need[2] else None,
            glv if need[3] else None, None, None)


_mixture_logpdf_op.register_autograd(_backward, setup_context=_setup_context)


# ========================================================================================
# 3. Public entry point
# ========================================================================================
def _check(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor) -> None:
    if z.dim() != 2:
        raise ValueError(f"mixture_logpdf: z must be [B, d], got shape {tuple(z.shape)}")
    if means.dim() != 2 or means.shape[1] != z.shape[1]:
        raise ValueError(f"mixture_logpdf: means must be [M, d={z.shape[1]}], got shape {tuple(means.shape)}")
    M, d = means.shape
    if M == 0:
        raise ValueError("mixture_logpdf: means must have at least one component, got shape (0, d)")
    if tuple(log_weights.shape) != (M,):
        raise ValueError(f"mixture_logpdf: log_weights must be [M={M}], got shape {tuple(log_weights.shape)}")
    if tuple(log_var.shape) not in ((), (M,), (M, d)):
        raise ValueError(f"mixture_logpdf: log_var must be 0-dim, [M={M}] or [M={M}, d={d}], "
                         f"got shape {tuple(log_var.shape)}")
    for name, t in (("z", z), ("means", means), ("log_weights", log_weights), ("log_var", log_var)):
        if not t.is_floating_point():
            raise TypeError(f"mixture_logpdf: {name} must be floating point, got {t.dtype}")
        if t.device != z.device:
            raise ValueError(f"mixture_logpdf: {name} is on {t.device}, z on {z.device}")


def mixture_logpdf(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Union[Tensor, float],
                   impl: str = "auto", chunk: int = 0) -> Tensor:
    """log sum_m exp(log_weights[m]) N(z; means[m], diag(exp(log_var[m]))) for each row of z.

    Args:
        z: [B, d] points.
        means: [M, d] component means.
        log_weights: [M] unnormalised log weights (the caller adds -log N).
        log_var: 0-dim (shared isotropic), [M] (per-component isotropic) or [M, d] (diagonal).
        impl: "auto" | "torch" | "triton" (see :func:`kernels.resolve_impl`).
        chunk: components per tile on the torch path (0: automatic, ~64 MiB per tile).

    Returns:
        [B] log-densities (dtype: promotion of the inputs). Differentiable in all four inputs
        (first order); memory O((B + M) d + B * chunk).
    """
    if not isinstance(log_var, Tensor):
        log_var = torch.tensor(float(log_var), dtype=means.dtype, device=means.device)
    _check(z, means, log_weights, log_var)
    requested = impl
    impl = resolve_impl(z, impl)
    if impl == "triton" and z.shape[1] > MAX_TRITON_D:
        if requested == "auto":
            impl = "torch"  # whole rows must fit one register tile; auto falls back quietly
        else:
            raise ValueError(f"mixture_logpdf: impl='triton' supports d <= {MAX_TRITON_D}, got z shape "
                             f"{tuple(z.shape)}; use impl='torch'")
    return _mixture_logpdf_op(z, means, log_weights, log_var, impl, int(chunk))[0]
