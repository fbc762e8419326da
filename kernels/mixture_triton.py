"""Triton kernels of the mixture-of-Gaussians log-density (see :mod:`kernels.mixture`).

Imported lazily by the launchers in :mod:`kernels.mixture`, so that ``import kernels`` never
imports triton: Triton decides at its own import time whether ``@triton.jit`` compiles or
interprets (``TRITON_INTERPRET=1``), and the torch path must not fix that choice early.

Every kernel sees the same operands, written once per pass by the preparation kernels
(kernels/mixture_prep_triton.py, launched by kernels/mixture.py ``_operands``):

    cross[b, m] = L[b] . R[m]          (K1 + K2 columns, zero padded; hi + lo tf32 parts of each)
    d2[b, m]    = max(cross + zz[b] + q[m], 0)
    s2[b, m]    = c2[m] - p2[m] * d2    (log2 units: log2(e) folded into c2 and p2 beforehand)

isotropic: L = z, R = -2 m, zz = |z|^2, q = |m|^2; diagonal: L = [z^2, z], R = [P, -2 P m],
zz = 0, q = sum P m^2. Rows are padded to BLOCK_B (g = 0, lse = +inf) and components to
BLOCK_M (c2 = -inf, p2 = 0): no masks anywhere. Each grid axis that would leave the device
idle is split (flash-decoding): programs write partial results that one combination kernel per
pass sums in a fixed order (deterministic, no atomics).

* ``_mixture_fwd_kernel``: (row tile, component split) -> partial max / sum of 2^s2.
* ``_mixture_bwd_z_kernel``: (row tile, component split) -> partial sum_m G w_m R[m] and
  sum_m G w_m, with G = g 2^(s2 - lse2), w = p (isotropic) or 1 (diagonal).
* ``_mixture_bwd_m_kernel``: (component tile, row split) with transposed scores (as
  flash-attention's dk/dv pass): partial sum_b G L[b], sum_b G, sum_b G d2.
"""
import triton
import triton.language as tl

# The launchers find every kernel by name on this module: the preparation and combination kernels live
# beside it (kernels/mixture_prep_triton.py), and so do the one-launch kernels of small problems
# (kernels/mixture_fused_triton.py).
from .mixture_prep_triton import (  # noqa: F401
    _mixture_combine_fwd_kernel, _mixture_finish_m_kernel, _mixture_finish_z_kernel,
    _mixture_prep_components_kernel, _mixture_prep_rows_kernel,
)
from .mixture_fused_triton import _mixture_fused_bwd_kernel, _mixture_fused_fwd_kernel  # noqa: F401
from .tf32_triton import _dot3, _split_tf32


@triton.jit
def _load_hilo(hi_ptr, lo_ptr, rows, col0, k_offs, KW: tl.constexpr):
    """hi and lo parts of columns [col0, col0 + len(k_offs)) of rows of a padded operand whose rows
    are KW floats long (no masks)."""
    offs = rows[:, None] * KW + col0 + k_offs[None, :]
    return tl.load(hi_ptr + offs), tl.load(lo_ptr + offs)


@triton.jit
def _load_hilo_t(hi_ptr, lo_ptr, rows, col0, k_offs, KW: tl.constexpr):
    """The same tile transposed, [len(k_offs), rows]: a loaded layout, no register transpose."""
    offs = rows[None, :] * KW + col0 + k_offs[:, None]
    return tl.load(hi_ptr + offs), tl.load(lo_ptr + offs)


@triton.jit
def _split_bounds(pid_s, TILES_PER_SPLIT, BLOCK: tl.constexpr, total):
    """[lo, hi) of the looped-over rows that split ``pid_s`` covers."""
    lo = pid_s * TILES_PER_SPLIT * BLOCK
    return lo, tl.minimum(lo + TILES_PER_SPLIT * BLOCK, total)


@triton.jit
def _log2_scores(cross, norms, c2, p2):
    """(d2, s2) of a tile; ``norms``, ``c2``, ``p2`` broadcast to the tile's orientation. The clamp
    propagates NaN (maximum would otherwise turn a NaN distance into 0)."""
    d2 = tl.maximum(cross + norms, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return d2, c2 - p2 * d2


# The K columns of L and R are two parts, [0, BLOCK_K) and [BLOCK_K, BLOCK_K + BLOCK_K2), each a power of two
# >= 16 (what tl.dot takes): d = 40 is 32 + 16 = 48 columns instead of 64 (a quarter less tensor-core
# work and shared memory). BLOCK_K2 = 0: one part. Rows are KW = BLOCK_K + BLOCK_K2 floats long.
@triton.jit
def _row_program(lh_ptr, ll_ptr, zz_ptr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr):
    """Rows of a program over z-row tiles: offsets, L hi / lo of both column parts (kept for the whole
    loop; the second part is unused when BLOCK_K2 = 0), |z|^2."""
    KW: tl.constexpr = BLOCK_K + BLOCK_K2
    b_offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    l_hi, l_lo = _load_hilo(lh_ptr, ll_ptr, b_offs, 0, tl.arange(0, BLOCK_K), KW)
    if BLOCK_K2 > 0:
        l2_hi, l2_lo = _load_hilo(lh_ptr, ll_ptr, b_offs, BLOCK_K, tl.arange(0, BLOCK_K2), KW)
    else:
        l2_hi, l2_lo = l_hi, l_lo
    return b_offs, l_hi, l_lo, l2_hi, l2_lo, tl.load(zz_ptr + b_offs)


@triton.jit
def _row_tile_scores(l_hi, l_lo, l2_hi, l2_lo, zz, rh_ptr, rl_ptr, c2_ptr, p2_ptr, q_ptr, m_offs,
                     BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
                     PRECISION: tl.constexpr):
    """(R hi, R lo of both parts, d2, s2) of a [BLOCK_B rows, BLOCK_M components] tile."""
    KW: tl.constexpr = BLOCK_K + BLOCK_K2
    r_hi, r_lo = _load_hilo(rh_ptr, rl_ptr, m_offs, 0, tl.arange(0, BLOCK_K), KW)
    cross = _dot3(l_hi, l_lo, tl.trans(r_hi), tl.trans(r_lo), tl.zeros((BLOCK_B, BLOCK_M), tl.float32), PRECISION)
    if BLOCK_K2 > 0:
        r2_hi, r2_lo = _load_hilo(rh_ptr, rl_ptr, m_offs, BLOCK_K, tl.arange(0, BLOCK_K2), KW)
        cross = _dot3(l2_hi, l2_lo, tl.trans(r2_hi), tl.trans(r2_lo), cross, PRECISION)
    else:
        r2_hi, r2_lo = r_hi, r_lo
    q = tl.load(q_ptr + m_offs)
    d2, s2 = _log2_scores(cross, zz[:, None] + q[None, :], tl.load(c2_ptr + m_offs)[None, :],
                          tl.load(p2_ptr + m_offs)[None, :])
    return r_hi, r_lo, r2_hi, r2_lo, d2, s2


@triton.jit
def _mixture_fwd_kernel(lh_ptr, ll_ptr, rh_ptr, rl_ptr, zz_ptr, c2_ptr, p2_ptr, q_ptr,
                        pmax_ptr, psum_ptr, B_pad, M_pad, TILES_PER_SPLIT,
                        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_K2: tl.constexpr, PRECISION: tl.constexpr):
    pid_s = tl.program_id(1)
    b_offs, l_hi, l_lo, l2_hi, l2_lo, zz = _row_program(lh_ptr, ll_ptr, zz_ptr, BLOCK_B, BLOCK_K, BLOCK_K2)
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    m_lo, m_hi = _split_bounds(pid_s, TILES_PER_SPLIT, BLOCK_M, M_pad)
    for start in range(m_lo, m_hi, BLOCK_M):
        m_offs = start + tl.arange(0, BLOCK_M)
        _, _, _, _, d2, s2 = _row_tile_scores(l_hi, l_lo, l2_hi, l2_lo, zz, rh_ptr, rl_ptr, c2_ptr, p2_ptr, q_ptr,
                                              m_offs, BLOCK_B, BLOCK_M, BLOCK_K, BLOCK_K2, PRECISION)
        new_max = tl.maximum(run_max, tl.max(s2, axis=1))
        # every score -inf so far (-inf weights, padding): subtract 0 instead of -inf (no NaN)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - safe) + tl.sum(tl.exp2(s2 - safe[:, None]), axis=1)
        run_max = new_max
    out_offs = pid_s * B_pad + b_offs
    tl.store(pmax_ptr + out_offs, run_max)
    tl.store(psum_ptr + out_offs, run_sum)


@triton.jit
def _mixture_bwd_z_kernel(lh_ptr, ll_ptr, rh_ptr, rl_ptr, zz_ptr, c2_ptr, p2_ptr, q_ptr, w_ptr,
                          lse2_ptr, g_ptr, py_ptr, pr_ptr, B_pad, M_pad, TILES_PER_SPLIT,
                          BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_K2: tl.constexpr, PRECISION: tl.constexpr):
    KW: tl.constexpr = BLOCK_K + BLOCK_K2
    pid_s = tl.program_id(1)
    b_offs, l_hi, l_lo, l2_hi, l2_lo, zz = _row_program(lh_ptr, ll_ptr, zz_ptr, BLOCK_B, BLOCK_K, BLOCK_K2)
    lse2 = tl.load(lse2_ptr + b_offs)
    g = tl.load(g_ptr + b_offs)
    acc_y = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    acc_y2 = tl.zeros((BLOCK_B, BLOCK_K2 if BLOCK_K2 > 0 else BLOCK_K), tl.float32)
    acc_r = tl.zeros((BLOCK_B,), tl.float32)
    m_lo, m_hi = _split_bounds(pid_s, TILES_PER_SPLIT, BLOCK_M, M_pad)
    for start in range(m_lo, m_hi, BLOCK_M):
        m_offs = start + tl.arange(0, BLOCK_M)
        r_hi, r_lo, r2_hi, r2_lo, d2, s2 = _row_tile_scores(l_hi, l_lo, l2_hi, l2_lo, zz, rh_ptr, rl_ptr, c2_ptr,
                                                            p2_ptr, q_ptr, m_offs, BLOCK_B, BLOCK_M, BLOCK_K,
                                                            BLOCK_K2, PRECISION)
        gw = (g[:, None] * tl.exp2(s2 - lse2[:, None])) * tl.load(w_ptr + m_offs)[None, :]
        acc_r += tl.sum(gw, axis=1)
        gw_hi, gw_lo = _split_tf32(gw)
        acc_y = _dot3(gw_hi, gw_lo, r_hi, r_lo, acc_y, PRECISION)
        if BLOCK_K2 > 0:
            acc_y2 = _dot3(gw_hi, gw_lo, r2_hi, r2_lo, acc_y2, PRECISION)
    out_offs = pid_s * B_pad + b_offs
    k_offs = tl.arange(0, BLOCK_K)
    tl.store(py_ptr + out_offs[:, None] * KW + k_offs[None, :], acc_y)
    if BLOCK_K2 > 0:
        tl.store(py_ptr + out_offs[:, None] * KW + BLOCK_K + tl.arange(0, BLOCK_K2)[None, :], acc_y2)
    tl.store(pr_ptr + out_offs, acc_r)


@triton.jit
def _mixture_bwd_m_kernel(lh_ptr, ll_ptr, rh_ptr, rl_ptr, zz_ptr, c2_ptr, p2_ptr, q_ptr,
                          lse2_ptr, g_ptr, px_ptr, pcs_ptr, pgd_ptr, B_pad, M_pad, TILES_PER_SPLIT,
                          BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_K2: tl.constexpr, PRECISION: tl.constexpr):
    KW: tl.constexpr = BLOCK_K + BLOCK_K2
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_offs = tl.arange(0, BLOCK_K)
    r_hi, r_lo = _load_hilo(rh_ptr, rl_ptr, m_offs, 0, k_offs, KW)
    if BLOCK_K2 > 0:
        r2_hi, r2_lo = _load_hilo(rh_ptr, rl_ptr, m_offs, BLOCK_K, tl.arange(0, BLOCK_K2), KW)
    c2 = tl.load(c2_ptr + m_offs)[:, None]
    p2 = tl.load(p2_ptr + m_offs)[:, None]
    q = tl.load(q_ptr + m_offs)
    acc_x = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    acc_x2 = tl.zeros((BLOCK_M, BLOCK_K2 if BLOCK_K2 > 0 else BLOCK_K), tl.float32)
    acc_cs = tl.zeros((BLOCK_M,), tl.float32)
    acc_gd = tl.zeros((BLOCK_M,), tl.float32)
    b_lo, b_hi = _split_bounds(pid_s, TILES_PER_SPLIT, BLOCK_B, B_pad)
    for start in range(b_lo, b_hi, BLOCK_B):
        b_offs = start + tl.arange(0, BLOCK_B)
        lt_hi, lt_lo = _load_hilo_t(lh_ptr, ll_ptr, b_offs, 0, k_offs, KW)  # L^T tile [K, BLOCK_B]
        # transposed scores [BLOCK_M, BLOCK_B]: G^T feeds the next dot without a transpose
        cross = _dot3(r_hi, r_lo, lt_hi, lt_lo, tl.zeros((BLOCK_M, BLOCK_B), tl.float32), PRECISION)
        if BLOCK_K2 > 0:
            lt2_hi, lt2_lo = _load_hilo_t(lh_ptr, ll_ptr, b_offs, BLOCK_K, tl.arange(0, BLOCK_K2), KW)
            cross = _dot3(r2_hi, r2_lo, lt2_hi, lt2_lo, cross, PRECISION)
        d2, s2 = _log2_scores(cross, q[:, None] + tl.load(zz_ptr + b_offs)[None, :], c2, p2)
        gt = tl.load(g_ptr + b_offs)[None, :] * tl.exp2(s2 - tl.load(lse2_ptr + b_offs)[None, :])
        acc_cs += tl.sum(gt, axis=1)
        acc_gd += tl.sum(gt * d2, axis=1)
        gt_hi, gt_lo = _split_tf32(gt)
        acc_x = _dot3(gt_hi, gt_lo, tl.trans(lt_hi), tl.trans(lt_lo), acc_x, PRECISION)
        if BLOCK_K2 > 0:
            acc_x2 = _dot3(gt_hi, gt_lo, tl.trans(lt2_hi), tl.trans(lt2_lo), acc_x2, PRECISION)
    out_offs = pid_s * M_pad + m_offs
    tl.store(px_ptr + out_offs[:, None] * KW + k_offs[None, :], acc_x)
    if BLOCK_K2 > 0:
        tl.store(px_ptr + out_offs[:, None] * KW + BLOCK_K + tl.arange(0, BLOCK_K2)[None, :], acc_x2)
    tl.store(pcs_ptr + out_offs, acc_cs)
    tl.store(pgd_ptr + out_offs, acc_gd)
