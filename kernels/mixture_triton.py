"""Triton kernels of the mixture-of-Gaussians log-density (see :mod:`kernels.mixture`).

Imported lazily by the launchers in :mod:`kernels.mixture`, so that ``import kernels`` never
imports triton: Triton decides at its own import time whether ``@triton.jit`` compiles or
interprets (``TRITON_INTERPRET=1``), and the torch path must not fix that choice early.

Forward: one program per tile of rows, online log-sum-exp over tiles of components.
Backward: responsibilities recomputed tile by tile (flash-attention style) in two kernels,
one per tile of rows (grad z) and one per tile of components (grad means / log_weights /
log_var): no atomics, deterministic, memory O((B + M) d).
"""
import triton
import triton.language as tl


@triton.jit
def _scores(zc, zz, m_ptr, m_offs, m_mask, d_offs, d_mask, D,
            c_ptr, q_ptr, p_ptr, stride_m,
            DIAG: tl.constexpr, PRECISION: tl.constexpr):
    """Scores s[b, m] and (precision-weighted) squared distances for one tile.

    Isotropic: d2 = max(|z|^2 + |m|^2 - 2 z.m, 0), s = c_m - 0.5 p_m d2.
    Diagonal : d2 = max(z^2 . P_m - 2 z . (P m)_m + q_m, 0), s = c_m - 0.5 d2, where the
    host passes P = exp(-log_var) and Pm = P * m (both [M, d]) and q = sum(P m^2).
    Returns (s, d2, p_m) with p_m = 1 for diag (unused there).
    """
    mk = m_mask[:, None] & d_mask[None, :]
    m_tile = tl.load(m_ptr + m_offs[:, None] * stride_m + d_offs[None, :], mask=mk, other=0.0)
    c = tl.load(c_ptr + m_offs, mask=m_mask, other=0.0)
    q = tl.load(q_ptr + m_offs, mask=m_mask, other=0.0)
    if DIAG:
        # m_ptr holds P*m here; p_ptr holds P [M, d]
        p_tile = tl.load(p_ptr + m_offs[:, None] * stride_m + d_offs[None, :], mask=mk, other=0.0)
        d2 = tl.dot(zc * zc, tl.trans(p_tile), input_precision=PRECISION) \
            - 2.0 * tl.dot(zc, tl.trans(m_tile), input_precision=PRECISION) + q[None, :]
        d2 = tl.maximum(d2, 0.0)
        s = c[None, :] - 0.5 * d2
        p = q * 0.0 + 1.0
    else:
        p = tl.load(p_ptr + m_offs, mask=m_mask, other=0.0)
        d2 = zz[:, None] + q[None, :] - 2.0 * tl.dot(zc, tl.trans(m_tile), input_precision=PRECISION)
        d2 = tl.maximum(d2, 0.0)
        s = c[None, :] - 0.5 * p[None, :] * d2
    s = tl.where(m_mask[None, :], s, float("-inf"))
    return s, d2, p

@triton.jit
def _mixture_fwd_kernel(z_ptr, m_ptr, c_ptr, q_ptr, p_ptr, out_ptr,
                        B, M, D, stride_z, stride_m,
                        DIAG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b_offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    d_offs = tl.arange(0, BLOCK_D)
    b_mask = b_offs < B
    d_mask = d_offs < D
    zc = tl.load(z_ptr + b_offs[:, None] * stride_z + d_offs[None, :],
                 mask=b_mask[:, None] & d_mask[None, :], other=0.0)
    zz = tl.sum(zc * zc, axis=1)
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    for start in range(0, M, BLOCK_M):
        m_offs = start + tl.arange(0, BLOCK_M)
        m_mask = m_offs < M
        s, d2, p = _scores(zc, zz, m_ptr, m_offs, m_mask, d_offs, d_mask, D,
                           c_ptr, q_ptr, p_ptr, stride_m, DIAG, PRECISION)
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # all -inf so far (e.g. -inf weights): subtract 0 instead of -inf to avoid NaN
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
        run_max = new_max
    out = run_max + tl.log(run_sum)
    tl.store(out_ptr + b_offs, out, mask=b_mask)

@triton.jit
def _mixture_bwd_z_kernel(z_ptr, m_ptr, mc_ptr, c_ptr, q_ptr, p_ptr, lse_ptr, g_ptr, gz_ptr,
                          B, M, D, stride_z, stride_m,
                          DIAG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """grad z_b = sum_m G_bm p_m (m_m - z_b), G = g_b * responsibility (isotropic);
    diag: sum_m G_bm (P m)_m - z_b * sum_m G_bm P_m."""
    pid = tl.program_id(0)
    b_offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    d_offs = tl.arange(0, BLOCK_D)
    b_mask = b_offs < B
    d_mask = d_offs < D
    zmask = b_mask[:, None] & d_mask[None, :]
    zc = tl.load(z_ptr + b_offs[:, None] * stride_z + d_offs[None, :], mask=zmask, other=0.0)
    zz = tl.sum(zc * zc, axis=1)
    lse = tl.load(lse_ptr + b_offs, mask=b_mask, other=0.0)
    g = tl.load(g_ptr + b_offs, mask=b_mask, other=0.0)
    acc_a = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)  # sum_m G p m   (diag: G @ (P m))
    acc_b = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)  # diag: G @ P
    acc_r = tl.zeros((BLOCK_B,), tl.float32)          # isotropic: sum_m G p
    for start in range(0, M, BLOCK_M):
        m_offs = start + tl.arange(0, BLOCK_M)
        m_mask = m_offs < M
        s, d2, p = _scores(zc, zz, m_ptr, m_offs, m_mask, d_offs, d_mask, D,
                           c_ptr, q_ptr, p_ptr, stride_m, DIAG, PRECISION)
        G = g[:, None] * tl.exp(s - lse[:, None])
        mk = m_mask[:, None] & d_mask[None, :]
        if DIAG:
            pm_tile = tl.load(m_ptr + m_offs[:, None] * stride_m + d_offs[None, :], mask=mk, other=0.0)
            p_tile = tl.load(p_ptr + m_offs[:, None] * stride_m + d_offs[None, :], mask=mk, other=0.0)
            acc_a += tl.dot(G, pm_tile, input_precision=PRECISION)
            acc_b += tl.dot(G, p_tile, input_precision=PRECISION)
        else:
            m_tile = tl.load(m_ptr + m_offs[:, None] * stride_m + d_offs[None, :], mask=mk, other=0.0)
            Gp = G * p[None, :]
            acc_a += tl.dot(Gp, m_tile, input_precision=PRECISION)
            acc_r += tl.sum(Gp, axis=1)
    if DIAG:
        gz = acc_a - zc * acc_b
    else:
        gz = acc_a - acc_r[:, None] * zc
    tl.store(gz_ptr + b_offs[:, None] * stride_z + d_offs[None, :], gz, mask=zmask)

@triton.jit
def _mixture_bwd_m_kernel(z_ptr, m_ptr, mc_ptr, c_ptr, q_ptr, p_ptr, lse_ptr, g_ptr,
                          gm_ptr, gw_ptr, glv_ptr,
                          B, M, D, stride_z, stride_m,
                          DIAG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Per tile of components: cs_m = sum_b G_bm (= grad log_weights), T = G^T z,
    grad m = p (T - cs m); grad log_var from sum_b G_bm d2_bm (iso) or G^T z^2 (diag)."""
    pid = tl.program_id(0)
    m_offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d_offs = tl.arange(0, BLOCK_D)
    m_mask = m_offs < M
    d_mask = d_offs < D
    mk = m_mask[:, None] & d_mask[None, :]
    cs = tl.zeros((BLOCK_M,), tl.float32)
    T = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    T2 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # diag: G^T z^2
    gd = tl.zeros((BLOCK_M,), tl.float32)          # iso: sum_b G p d2
    for start in range(0, B, BLOCK_B):
        b_offs = start + tl.arange(0, BLOCK_B)
        b_mask = b_offs < B
        zc = tl.load(z_ptr + b_offs[:, None] * stride_z + d_offs[None, :],
                     mask=b_mask[:, None] & d_mask[None, :], other=0.0)
        zz = tl.sum(zc * zc, axis=1)
        lse = tl.load(lse_ptr + b_offs, mask=b_mask, other=0.0)
        g = tl.load(g_ptr + b_offs, mask=b_mask, other=0.0)
        s, d2, p = _scores(zc, zz, m_ptr, m_offs, m_mask, d_offs, d_mask, D,
                           c_ptr, q_ptr, p_ptr, stride_m, DIAG, PRECISION)
        G = g[:, None] * tl.exp(s - lse[:, None])
        G = tl.where(b_mask[:, None], G, 0.0)
        cs += tl.sum(G, axis=0)
        Gt = tl.trans(G)
        T += tl.dot(Gt, zc, input_precision=PRECISION)
        if DIAG:
            T2 += tl.dot(Gt, zc * zc, input_precision=PRECISION)
        else:
            gd += tl.sum(G * d2, axis=0) * p
    mc = tl.load(mc_ptr + m_offs[:, None] * stride_m + d_offs[None, :], mask=mk, other=0.0)
    tl.store(gw_ptr + m_offs, cs, mask=m_mask)
    if DIAG:
        p_tile = tl.load(p_ptr + m_offs[:, None] * stride_m + d_offs[None, :], mask=mk, other=0.0)
        gm = p_tile * (T - cs[:, None] * mc)
        sq = T2 - 2.0 * mc * T + mc * mc * cs[:, None]
        glv = -0.5 * cs[:, None] + 0.5 * p_tile * sq
        tl.store(glv_ptr + m_offs[:, None] * stride_m + d_offs[None, :], glv, mask=mk)
    else:
        p = tl.load(p_ptr + m_offs, mask=m_mask, other=0.0)
        gm = p[:, None] * (T - cs[:, None] * mc)
        glv = -0.5 * D * cs + 0.5 * gd
        tl.store(glv_ptr + m_offs, glv, mask=m_mask)
    tl.store(gm_ptr + m_offs[:, None] * stride_m + d_offs[None, :], gm, mask=mk)
