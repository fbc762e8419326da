"""Triton kernels around the mixture kernels: operand preparation and the combination of splits.

At the training shape (100 rows, 500 components) a call is launch bound: what counts is how many kernels
the host issues. Built from torch operators, the centring, tf32 split, padding and per-component
constants took ~35 launches per pass and the combination of the splits ~10 more (forward) or ~25
(backward). These kernels do the same in one launch each (``bype bench kernels --launches`` counts them):

* ``_mixture_prep_rows_kernel``: z rows -> L hi / lo [B_pad, K], |z - c|^2 (isotropic) [B_pad]; in the backward
  also the padded lse2 (log2 units, +inf for rows of zero density or padding) and g (0 there).
* ``_mixture_prep_components_kernel``: means, log weights, log-variances -> R hi / lo [M_pad, K] and
  c2, p2, q, w [M_pad] (padding: c2 = -inf, the rest 0).
* ``_mixture_combine_fwd_kernel``: partial max / sum per split -> log-density [B] (fixed order, deterministic).
* ``_mixture_finish_z_kernel``, ``_mixture_finish_m_kernel``: partial backward sums per split -> the
  gradients of z and of (means, log weights, log-variances), the formulas of
  ``kernels.mixture.triton_backward``'s docstring.

Every operand definition is the one in :mod:`kernels.mixture_triton`'s docstring; ``c`` is the centre
(the mean of the means, computed by the host: one reduction). Rows beyond B / M and columns beyond the
used K are written as padding, so the main kernels need no masks.
"""
import triton
import triton.language as tl

from .tf32_triton import _tf32_hi

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LOG_2PI = tl.constexpr(1.8378770664093453)


@triton.jit
def _store_hilo(hi_ptr, lo_ptr, rows, cols, x, KW: tl.constexpr):
    """x's tf32 high part and fp32 remainder into the first KW columns of rows of [*, KW] operands."""
    offs = rows[:, None] * KW + cols[None, :]
    mask = (cols < KW)[None, :] & (rows >= 0)[:, None]  # BLOCK_K >= KW columns were computed
    hi = _tf32_hi(x)
    tl.store(hi_ptr + offs, hi, mask=mask)
    tl.store(lo_ptr + offs, x - hi, mask=mask)


@triton.jit
def _centred_k_layout(x_ptr, c_ptr, rows, n, cols, d, stride, TWICE: tl.constexpr):
    """(mask, coord, x - c) of [rows, cols] in the column layout of L / R: column j holds coordinate j
    and, with TWICE (the diagonal layout's 2d columns), column d + j holds coordinate j again; zero
    outside the mask (rows >= n, unused columns)."""
    coord = tl.where(cols < d, cols, cols - d) if TWICE else cols
    used = cols < (2 * d if TWICE else d)
    mask = (rows < n)[:, None] & used[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride + coord[None, :], mask=mask, other=0.0).to(tl.float32)
    return mask, coord, tl.where(mask, x - tl.load(c_ptr + coord, mask=used, other=0.0)[None, :], 0.0)


@triton.jit
def _row_log_var(lv_ptr, rows, live, SHARED: tl.constexpr):
    """The isotropic log-variance of each row: one shared value (a 0-dim tensor) or one per row."""
    if SHARED:
        lv = tl.load(lv_ptr + rows * 0)
    else:
        lv = tl.load(lv_ptr + rows, mask=live, other=0.0)
    return lv.to(tl.float32)


@triton.jit
def _row_weights(lse_ptr, grad_ptr, rows, B, stride_g):
    """(lse2, g) of rows: log2 units; +inf and 0 for rows of zero density or beyond B (no gradient: every
    2^(s2 - lse2) must be 0, g 0)."""
    live = rows < B
    lse = tl.load(lse_ptr + rows, mask=live, other=float("-inf"))
    g = tl.load(grad_ptr + rows * stride_g, mask=live, other=0.0).to(tl.float32)
    dead = lse == float("-inf")
    return tl.where(dead, float("inf"), lse * LOG2E), tl.where(dead, 0.0, g)


@triton.jit
def _mixture_prep_rows_kernel(z_ptr, c_ptr, lh_ptr, ll_ptr, zz_ptr, out_ptr, grad_ptr, lse2_ptr, g_ptr,
                      B, d, stride_z,
                      DIAG: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, KW: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    _, _, zc = _centred_k_layout(z_ptr, c_ptr, rows, B, cols, d, stride_z, DIAG)  # L = z or [z^2, z]
    if DIAG:
        _store_hilo(lh_ptr, ll_ptr, rows, cols, tl.where(cols[None, :] < d, zc * zc, zc), KW)
        tl.store(zz_ptr + rows, tl.zeros((BLOCK_R,), tl.float32))
    else:
        _store_hilo(lh_ptr, ll_ptr, rows, cols, zc, KW)
        tl.store(zz_ptr + rows, tl.sum(zc * zc, axis=1))
    if BACKWARD:
        lse2, g = _row_weights(out_ptr, grad_ptr, rows, B, 1)
        tl.store(lse2_ptr + rows, lse2)
        tl.store(g_ptr + rows, g)


@triton.jit
def _mixture_prep_components_kernel(means_ptr, c_ptr, lw_ptr, lv_ptr, rh_ptr, rl_ptr, c2_ptr, p2_ptr, q_ptr, w_ptr,
                            M, d, stride_m, stride_lv,
                            LV_MODE: tl.constexpr, BLOCK_R: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """LV_MODE 0: shared log-variance (0-dim), 1: one per component [M], 2: diagonal [M, d]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < M
    dcols = tl.arange(0, BLOCK_D)
    dmask, mc = _centred_rows(means_ptr, c_ptr, rows, dcols, M, d, stride_m)
    mc = tl.where(dmask, mc, 0.0)
    lw = tl.load(lw_ptr + rows, mask=live, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_K)
    if LV_MODE == 2:
        lv = tl.load(lv_ptr + rows[:, None] * stride_lv + dcols[None, :], mask=dmask, other=0.0).to(tl.float32)
        prec = tl.where(dmask, tl.exp(-lv), 0.0)
        c = lw - 0.5 * (LOG_2PI * d + tl.sum(lv, axis=1))
        q = tl.sum(prec * mc * mc, axis=1)
        # R = [P, -2 P m]: the means and log-variances loaded again in the K-column layout
        kmask, coord, mk = _centred_k_layout(means_ptr, c_ptr, rows, M, cols, d, stride_m, True)
        pk = tl.exp(-tl.load(lv_ptr + rows[:, None] * stride_lv + coord[None, :], mask=kmask, other=0.0).to(tl.float32))
        r = tl.where(kmask, tl.where(cols[None, :] < d, pk, -2.0 * pk * mk), 0.0)
        p2 = tl.full((BLOCK_R,), 0.5 * LOG2E, tl.float32)
        w = tl.full((BLOCK_R,), 1.0, tl.float32)
    else:
        lv = _row_log_var(lv_ptr, rows, live, LV_MODE == 0)
        p = tl.exp(-lv)
        c = lw - 0.5 * d * (LOG_2PI + lv)
        q = tl.sum(mc * mc, axis=1)
        _, _, mk = _centred_k_layout(means_ptr, c_ptr, rows, M, cols, d, stride_m, False)
        r = -2.0 * mk  # R = -2 m, zero outside the used columns
        p2 = 0.5 * LOG2E * p
        w = p
    _store_hilo(rh_ptr, rl_ptr, rows, cols, r, KW)
    tl.store(c2_ptr + rows, tl.where(live, LOG2E * c, float("-inf")))
    tl.store(p2_ptr + rows, tl.where(live, p2, 0.0))
    tl.store(q_ptr + rows, tl.where(live, q, 0.0))
    tl.store(w_ptr + rows, tl.where(live, w, 0.0))


@triton.jit
def _mixture_combine_fwd_kernel(pmax_ptr, psum_ptr, out_ptr, B, B_pad, SPLITS, BLOCK_R: tl.constexpr):
    """out = ln 2 * (max + log2 sum_s psum_s 2^(pmax_s - max)); all -inf: -inf + log2(0) = -inf."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mx = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for s in range(SPLITS):
        mx = tl.maximum(mx, tl.load(pmax_ptr + s * B_pad + rows), propagate_nan=tl.PropagateNan.ALL)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.zeros((BLOCK_R,), tl.float32)
    for s in range(SPLITS):
        total += tl.load(psum_ptr + s * B_pad + rows) * tl.exp2(tl.load(pmax_ptr + s * B_pad + rows) - safe)
    tl.store(out_ptr + rows, (mx + tl.log2(total)) * LN2, mask=rows < B)


@triton.jit
def _centred_rows(x_ptr, c_ptr, rows, dcols, n, d, stride):
    """(mask, x - c) of a [rows, BLOCK_D] tile of an [n, d] input, zero outside."""
    mask = (rows < n)[:, None] & (dcols < d)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride + dcols[None, :], mask=mask, other=0.0).to(tl.float32)
    return mask, x - tl.load(c_ptr + dcols, mask=dcols < d, other=0.0)[None, :]


@triton.jit
def _split_sums(p_ptr, rows, dcols, mask, n_pad, d, SPLITS, TWO: tl.constexpr, KW: tl.constexpr):
    """sum over splits s of the partial [splits, n_pad, KW] sums: columns [0, d) and, with TWO, [d, 2d)."""
    first = tl.zeros(mask.shape, tl.float32)
    second = tl.zeros(mask.shape, tl.float32)
    for s in range(SPLITS):
        base = (s * n_pad + rows)[:, None] * KW + dcols[None, :]
        first += tl.load(p_ptr + base, mask=mask, other=0.0)
        if TWO:
            second += tl.load(p_ptr + base + d, mask=mask, other=0.0)
    return first, second


@triton.jit
def _split_sum(p_ptr, rows, n_pad, SPLITS):
    """sum over splits s of the partial [splits, n_pad] sums."""
    total = tl.zeros(rows.shape, tl.float32)
    for s in range(SPLITS):
        total += tl.load(p_ptr + s * n_pad + rows)
    return total


@triton.jit
def _mixture_finish_z_kernel(py_ptr, pr_ptr, z_ptr, c_ptr, gz_ptr, B, B_pad, d, stride_z, SPLITS,
                     DIAG: tl.constexpr, BLOCK_R: tl.constexpr, KW: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y = sum_s py_s, r = sum_s pr_s; isotropic (Y = -2 G p m): dz = -Y/2 - r (z - c);
    diagonal (Y = [G P, -2 G P m]): dz = -Y[:, d:2d] / 2 - (z - c) Y[:, :d]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dcols = tl.arange(0, BLOCK_D)
    mask, zc = _centred_rows(z_ptr, c_ptr, rows, dcols, B, d, stride_z)
    first, second = _split_sums(py_ptr, rows, dcols, mask, B_pad, d, SPLITS, DIAG, KW)  # Y[:, :d], Y[:, d:2d]
    if DIAG:
        gz = -0.5 * second - zc * first
    else:
        gz = -0.5 * first - _split_sum(pr_ptr, rows, B_pad, SPLITS)[:, None] * zc
    tl.store(gz_ptr + rows[:, None] * d + dcols[None, :], gz, mask=mask)


@triton.jit
def _mixture_finish_m_kernel(px_ptr, pcs_ptr, pgd_ptr, means_ptr, c_ptr, lv_ptr, gm_ptr, gw_ptr, glv_ptr,
                     M, M_pad, d, stride_m, stride_lv, SPLITS,
                     LV_MODE: tl.constexpr, BLOCK_R: tl.constexpr, KW: tl.constexpr, BLOCK_D: tl.constexpr):
    """X = sum_s px_s, cs = sum_s pcs_s, gd = sum_s pgd_s; dlog_w = cs;
    isotropic (X = G^T z, gd = sum_b G |z_b - m|^2): dm = p (X - cs m), dlv = -d cs / 2 + p gd / 2 per row
    (the host sums them for a shared log-variance); diagonal (X = [G^T z^2, G^T z]): dm = P (T - cs m),
    dlv = -cs / 2 + P (T2 - 2 m T + m^2 cs) / 2."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dcols = tl.arange(0, BLOCK_D)
    live = rows < M
    mask, mc = _centred_rows(means_ptr, c_ptr, rows, dcols, M, d, stride_m)
    first, second = _split_sums(px_ptr, rows, dcols, mask, M_pad, d, SPLITS, LV_MODE == 2, KW)  # T2, T (diag)
    cs = _split_sum(pcs_ptr, rows, M_pad, SPLITS)
    gd = _split_sum(pgd_ptr, rows, M_pad, SPLITS)
    tl.store(gw_ptr + rows, cs, mask=live)
    out = rows[:, None] * d + dcols[None, :]
    if LV_MODE == 2:
        lv = tl.load(lv_ptr + rows[:, None] * stride_lv + dcols[None, :], mask=mask, other=0.0)
        prec = tl.exp(-lv.to(tl.float32))
        csb = cs[:, None]
        tl.store(gm_ptr + out, prec * (second - csb * mc), mask=mask)
        glv = -0.5 * csb + 0.5 * prec * (first - 2.0 * mc * second + mc * mc * csb)
        tl.store(glv_ptr + out, glv, mask=mask)
    else:
        p = tl.exp(-_row_log_var(lv_ptr, rows, live, LV_MODE == 0))
        tl.store(gm_ptr + out, p[:, None] * (first - cs[:, None] * mc), mask=mask)
        tl.store(glv_ptr + rows, -0.5 * d * cs + 0.5 * p * gd, mask=live)
