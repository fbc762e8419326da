"""One launch per pass: the mixture kernels of small problems (the training shape, B = 100, M = 500).

At the training shape a call is launch bound (microseconds of device work behind each launch), so
what counts is how many kernels the host issues. The split path (kernels/mixture_triton.py) prepares
padded tf32 operands, runs a tiled pass and combines its splits: 4 launches forward, 6 backward. Here
each pass is one kernel that reads the inputs as given (strided rows, any float dtype):

* ``_mixture_fused_fwd_kernel``: one program per tile of z rows loops over every component and
  writes the log-density in the output dtype and in fp32 (the backward's lse).
* ``_mixture_fused_bwd_kernel``: programs ``[0, Z_PROGRAMS)`` take tiles of z rows (grad z), the rest
  tiles of components (grads of means, log weights, log-variances) with transposed scores.

Every program first computes the centre (the mean of the means, the same sum in the same order in
every program: the density is shift invariant and centred distances keep fp32 accuracy), and splits
its operands into tf32 parts in registers (3xTF32, kernels/tf32_triton.py). The operands are those of
kernels/mixture_triton.py's docstring, built per tile: L = z or [z^2, z], R = -2 m or [P, -2 P m],
in log2 units. No loop is split: kernels.mixture picks this path only while each loop is a few tiles
long (``FUSED_LOOP_TILES``).
"""
import triton
import triton.language as tl

from .mixture_prep_triton import LN2, LOG2E, LOG_2PI, _row_log_var, _row_weights
from .tf32_triton import _dot3, _split_tf32


@triton.jit
def _centre(means_ptr, M, d, stride_m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The mean of the means, [BLOCK_D] (zero beyond d)."""
    dcols = tl.arange(0, BLOCK_D)
    total = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & (dcols < d)[None, :]
        x = tl.load(means_ptr + rows[:, None] * stride_m + dcols[None, :], mask=mask, other=0.0)
        total += tl.sum(x.to(tl.float32), axis=0)
    return total / M


@triton.jit
def _centred(x_ptr, c, rows, n, d, stride, BLOCK_D: tl.constexpr):
    """(mask, x - c) of a [rows, BLOCK_D] tile of an [n, d] input, zero outside the mask."""
    dcols = tl.arange(0, BLOCK_D)
    mask = (rows < n)[:, None] & (dcols < d)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride + dcols[None, :], mask=mask, other=0.0).to(tl.float32)
    return mask, tl.where(mask, x - c[None, :], 0.0)


@triton.jit
def _row_side(zc, DIAG: tl.constexpr):
    """L's two column parts and zz of a tile of centred rows: (z, unused, |z|^2) or (z^2, z, 0)."""
    if DIAG:
        return zc * zc, zc, tl.zeros((zc.shape[0],), tl.float32)
    return zc, zc, tl.sum(zc * zc, axis=1)


@triton.jit
def _component_side(means_ptr, lw_ptr, lv_ptr, c, m_offs, M, d, stride_m, stride_lv,
                    LV_MODE: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile of components: (mc, prec, R's two parts, c2, p2, q, w).

    mc: centred means [BLOCK_M, BLOCK_D]; prec: P = exp(-log_var) [BLOCK_M, BLOCK_D] (diagonal) or p [BLOCK_M];
    c2 = log2 e (log w - (d log 2 pi + sum log_var) / 2), -inf beyond M; s2 = c2 - p2 d2 with d2 = cross + zz + q;
    w: the responsibility weight of grad z (p isotropic, 1 diagonal)."""
    live = m_offs < M
    mask, mc = _centred(means_ptr, c, m_offs, M, d, stride_m, BLOCK_D)
    lw = tl.load(lw_ptr + m_offs, mask=live, other=0.0).to(tl.float32)
    if LV_MODE == 2:
        dcols = tl.arange(0, BLOCK_D)
        lv = tl.load(lv_ptr + m_offs[:, None] * stride_lv + dcols[None, :], mask=mask, other=0.0).to(tl.float32)
        prec = tl.where(mask, tl.exp(-lv), 0.0)
        const = lw - 0.5 * (LOG_2PI * d + tl.sum(lv, axis=1))
        r1, r2 = prec, -2.0 * prec * mc
        q = tl.sum(prec * mc * mc, axis=1)
        p2 = tl.full((m_offs.shape[0],), 0.5 * LOG2E, tl.float32)
        w = tl.full((m_offs.shape[0],), 1.0, tl.float32)
    else:
        lv = _row_log_var(lv_ptr, m_offs, live, LV_MODE == 0)
        prec = tl.exp(-lv)
        const = lw - 0.5 * d * (LOG_2PI + lv)
        r1 = -2.0 * mc
        r2 = r1
        q = tl.sum(mc * mc, axis=1)
        p2 = 0.5 * LOG2E * prec
        w = prec
    return mc, prec, r1, r2, tl.where(live, LOG2E * const, float("-inf")), p2, q, w


@triton.jit
def _clamp0(x):
    """max(x, 0) that keeps NaN (a NaN input must give NaN, not a zero distance)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _split_parts(x1, x2, DIAG: tl.constexpr):
    """tf32 hi / lo of both column parts; the isotropic layout has one part (returned twice, unused)."""
    h1, l1 = _split_tf32(x1)
    if DIAG:
        h2, l2 = _split_tf32(x2)
    else:
        h2, l2 = h1, l1
    return h1, l1, h2, l2


@triton.jit
def _cross(a1_hi, a1_lo, a2_hi, a2_lo, b1_hi, b1_lo, b2_hi, b2_lo, DIAG: tl.constexpr, PRECISION: tl.constexpr):
    """L . R of every pair of rows of a and b, [rows of a, rows of b]: both column parts on the diagonal
    layout, one on the isotropic; 3xTF32."""
    cross = tl.zeros((a1_hi.shape[0], b1_hi.shape[0]), tl.float32)
    cross = _dot3(a1_hi, a1_lo, tl.trans(b1_hi), tl.trans(b1_lo), cross, PRECISION)
    if DIAG:
        cross = _dot3(a2_hi, a2_lo, tl.trans(b2_hi), tl.trans(b2_lo), cross, PRECISION)
    return cross


@triton.jit
def _row_tile_scores(l1_hi, l1_lo, l2_hi, l2_lo, zz, means_ptr, lw_ptr, lv_ptr, c, m_offs, M, d, stride_m, stride_lv,
                     LV_MODE: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Scores s2 [rows, BLOCK_M] of a program's rows against one tile of components, with the tile's R parts
    and gradient weight w (what the z backward multiplies by)."""
    DIAG: tl.constexpr = LV_MODE == 2
    mc, prec, r1, r2, c2, p2, q, w = _component_side(means_ptr, lw_ptr, lv_ptr, c, m_offs, M, d, stride_m, stride_lv,
                                                     LV_MODE, BLOCK_D)
    r1_hi, r1_lo, r2_hi, r2_lo = _split_parts(r1, r2, DIAG)
    cross = _cross(l1_hi, l1_lo, l2_hi, l2_lo, r1_hi, r1_lo, r2_hi, r2_lo, DIAG, PRECISION)
    s2 = c2[None, :] - p2[None, :] * _clamp0(cross + (zz[:, None] + q[None, :]))
    return r1_hi, r1_lo, r2_hi, r2_lo, w, s2


@triton.jit
def _mixture_fused_fwd_kernel(z_ptr, means_ptr, lw_ptr, lv_ptr, out_ptr, lse_ptr, B, M, d,
                              stride_z, stride_m, stride_lv,
                              LV_MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    DIAG: tl.constexpr = LV_MODE == 2
    c = _centre(means_ptr, M, d, stride_m, BLOCK_M, BLOCK_D)
    b_offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    zmask, zc = _centred(z_ptr, c, b_offs, B, d, stride_z, BLOCK_D)
    l1, l2, zz = _row_side(zc, DIAG)
    l1_hi, l1_lo, l2_hi, l2_lo = _split_parts(l1, l2, DIAG)
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    for start in range(0, M, BLOCK_M):
        m_offs = start + tl.arange(0, BLOCK_M)
        r1_hi, r1_lo, r2_hi, r2_lo, w, s2 = _row_tile_scores(l1_hi, l1_lo, l2_hi, l2_lo, zz, means_ptr, lw_ptr, lv_ptr,
                                                             c, m_offs, M, d, stride_m, stride_lv, LV_MODE, BLOCK_D,
                                                             PRECISION)
        new_max = tl.maximum(run_max, tl.max(s2, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: no NaN from -inf - -inf
        run_sum = run_sum * tl.exp2(run_max - safe) + tl.sum(tl.exp2(s2 - safe[:, None]), axis=1)
        run_max = new_max
    lse = (run_max + tl.log2(run_sum)) * LN2
    live = b_offs < B
    tl.store(lse_ptr + b_offs, lse, mask=live)
    tl.store(out_ptr + b_offs, lse.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _mixture_fused_bwd_kernel(grad_ptr, z_ptr, means_ptr, lw_ptr, lv_ptr, lse_ptr, gz_ptr, gm_ptr, gw_ptr, glv_ptr,
                              B, M, d, stride_g, stride_z, stride_m, stride_lv, Z_PROGRAMS,
                              LV_MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """G = g 2^(s2 - lse2). z rows: dz = -Y2 / 2 - r z (isotropic: Y2 = sum_m G p R, r = sum_m G p) or
    -Y2 / 2 - z Y1 (diagonal: Y1 = sum_m G P). Components: the formulas of _mixture_finish_m_kernel from
    X1 = G^T L1, X2 = G^T L2, cs = sum_b G, gd = sum_b G d2. Gradients are stored in their tensors' dtypes."""
    DIAG: tl.constexpr = LV_MODE == 2
    pid = tl.program_id(0)
    c = _centre(means_ptr, M, d, stride_m, BLOCK_M, BLOCK_D)
    dcols = tl.arange(0, BLOCK_D)
    if pid < Z_PROGRAMS:
        b_offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        zmask, zc = _centred(z_ptr, c, b_offs, B, d, stride_z, BLOCK_D)
        l1, l2, zz = _row_side(zc, DIAG)
        l1_hi, l1_lo, l2_hi, l2_lo = _split_parts(l1, l2, DIAG)
        lse2, g = _row_weights(lse_ptr, grad_ptr, b_offs, B, stride_g)
        acc_y1 = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        acc_y2 = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        acc_r = tl.zeros((BLOCK_B,), tl.float32)
        for start in range(0, M, BLOCK_M):
            m_offs = start + tl.arange(0, BLOCK_M)
            r1_hi, r1_lo, r2_hi, r2_lo, w, s2 = _row_tile_scores(l1_hi, l1_lo, l2_hi, l2_lo, zz, means_ptr, lw_ptr,
                                                                 lv_ptr, c, m_offs, M, d, stride_m, stride_lv, LV_MODE,
                                                                 BLOCK_D, PRECISION)
            gw = g[:, None] * tl.exp2(s2 - lse2[:, None]) * w[None, :]
            gw_hi, gw_lo = _split_tf32(gw)
            if DIAG:
                acc_y1 = _dot3(gw_hi, gw_lo, r1_hi, r1_lo, acc_y1, PRECISION)  # sum_m G P
                acc_y2 = _dot3(gw_hi, gw_lo, r2_hi, r2_lo, acc_y2, PRECISION)  # sum_m G (-2 P m)
            else:
                acc_y2 = _dot3(gw_hi, gw_lo, r1_hi, r1_lo, acc_y2, PRECISION)  # sum_m G p (-2 m)
                acc_r += tl.sum(gw, axis=1)
        if DIAG:
            gz = -0.5 * acc_y2 - zc * acc_y1
        else:
            gz = -0.5 * acc_y2 - acc_r[:, None] * zc
        tl.store(gz_ptr + b_offs[:, None] * d + dcols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=zmask)
    else:
        m_offs = (pid - Z_PROGRAMS) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = m_offs < M
        mc, prec, r1, r2, c2, p2, q, w = _component_side(means_ptr, lw_ptr, lv_ptr, c, m_offs, M, d, stride_m,
                                                         stride_lv, LV_MODE, BLOCK_D)
        mmask = live[:, None] & (dcols < d)[None, :]
        r1_hi, r1_lo, r2_hi, r2_lo = _split_parts(r1, r2, DIAG)
        acc_x1 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        acc_x2 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        acc_cs = tl.zeros((BLOCK_M,), tl.float32)
        acc_gd = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, B, BLOCK_B):
            b_offs = start + tl.arange(0, BLOCK_B)
            zmask, zc = _centred(z_ptr, c, b_offs, B, d, stride_z, BLOCK_D)
            l1, l2, zz = _row_side(zc, DIAG)
            l1_hi, l1_lo, l2_hi, l2_lo = _split_parts(l1, l2, DIAG)
            # transposed scores [BLOCK_M, BLOCK_B]: G^T feeds the next products without a transpose
            cross = _cross(r1_hi, r1_lo, r2_hi, r2_lo, l1_hi, l1_lo, l2_hi, l2_lo, DIAG, PRECISION)
            d2 = _clamp0(cross + (q[:, None] + zz[None, :]))
            lse2, g = _row_weights(lse_ptr, grad_ptr, b_offs, B, stride_g)
            gt = g[None, :] * tl.exp2(c2[:, None] - p2[:, None] * d2 - lse2[None, :])
            acc_cs += tl.sum(gt, axis=1)
            gt_hi, gt_lo = _split_tf32(gt)
            if DIAG:
                acc_x1 = _dot3(gt_hi, gt_lo, l1_hi, l1_lo, acc_x1, PRECISION)  # sum_b G z^2
                acc_x2 = _dot3(gt_hi, gt_lo, l2_hi, l2_lo, acc_x2, PRECISION)  # sum_b G z
            else:
                acc_x1 = _dot3(gt_hi, gt_lo, l1_hi, l1_lo, acc_x1, PRECISION)  # sum_b G z
                acc_gd += tl.sum(gt * d2, axis=1)
        out = m_offs[:, None] * d + dcols[None, :]
        tl.store(gw_ptr + m_offs, acc_cs.to(gw_ptr.dtype.element_ty), mask=live)
        cs = acc_cs[:, None]
        if DIAG:
            gm = prec * (acc_x2 - cs * mc)
            glv = -0.5 * cs + 0.5 * prec * (acc_x1 - 2.0 * mc * acc_x2 + mc * mc * cs)
            tl.store(glv_ptr + out, glv.to(glv_ptr.dtype.element_ty), mask=mmask)
        else:
            gm = prec[:, None] * (acc_x1 - cs * mc)
            tl.store(glv_ptr + m_offs, (-0.5 * d * acc_cs + 0.5 * prec * acc_gd).to(glv_ptr.dtype.element_ty),
                     mask=live)
        tl.store(gm_ptr + out, gm.to(gm_ptr.dtype.element_ty), mask=mmask)
