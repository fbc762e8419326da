"""Triton kernels of the discretised-logistic coreset gradient (see :mod:`kernels.coreset_grads`).

Imported lazily (like :mod:`kernels.mixture_triton`) so ``import kernels`` never imports triton.

* ``_logistic_pairwise_kernel``: ``out[n, s] = sum_d log p(x_nd | mean_sd, scale_sd)``, one
  program per (n-tile, s-tile), looping over pixel tiles: the ``n x s x d`` cube only ever
  exists one ``[BLOCK_N, BLOCK_S, BLOCK_D]`` register tile at a time.
* ``_logistic_grad_kernel``: ``out[n, d] = sum_s (d/dx) log p(x_nd | theta_sd) * r_s``, one
  program per (n-tile, d-tile, sample split), looping over the split's sample tiles; the host
  sums the splits in a fixed order (deterministic).

The host passes ``inv2 = log2(e) exp(-log_scale)`` (scores in log2 units, so ``exp2``/``log2``
with nothing folded in the loop) and ``mid2 = log2(-expm1(-2h inv))`` per (s, d): the last term
of the middle-bin formula does not depend on x, and torch's expm1 keeps it exact for wide
scales where ``1 - exp(-t)`` would cancel. Rows (n, s) are padded to the tiles on the host, so
the only mask left is on a ragged last pixel tile (``EVEN_D`` skips it when D divides).
"""
import triton
import triton.language as tl

HALF_BIN = tl.constexpr(1.0 / 510.0)  # a plain global would not compile (interpreter accepts it)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _logistic_pairwise_kernel(x_ptr, mean_ptr, inv2_ptr, mid2_ptr, out_ptr, S_pad, D,
                              BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                              EVEN_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s_offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)  # log2 units
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        x_offs = n_offs[:, None] * D + d_offs[None, :]
        p_offs = s_offs[:, None] * D + d_offs[None, :]
        if EVEN_D:
            x = tl.load(x_ptr + x_offs)
            mu = tl.load(mean_ptr + p_offs)
            inv2 = tl.load(inv2_ptr + p_offs)
            mid2 = tl.load(mid2_ptr + p_offs)
        else:  # padded pixels: x = 0.5 and inv2 = 0 give lp = -2 + mid2 = 0 with mid2 = 2
            dm = (d_offs < D)[None, :]
            x = tl.load(x_ptr + x_offs, mask=dm, other=0.5)
            mu = tl.load(mean_ptr + p_offs, mask=dm, other=0.5)
            inv2 = tl.load(inv2_ptr + p_offs, mask=dm, other=0.0)
            mid2 = tl.load(mid2_ptr + p_offs, mask=dm, other=2.0)
        x3 = x[:, None, :]
        xm = x3 - mu[None, :, :]
        inv3 = inv2[None, :, :]
        a = (xm + HALF_BIN) * inv3
        nb = (HALF_BIN - xm) * inv3  # -b
        ea = 1.0 + tl.exp2(-tl.abs(a))
        eb = 1.0 + tl.exp2(-tl.abs(nb))
        left = x3 < HALF_BIN
        right = x3 > 1.0 - HALF_BIN
        # log2 sigmoid(t) = min(t, 0) - log2(1 + 2^-|t|): one log2 per element for either edge
        # bin or the middle bin (log2 of the product of the two)
        lin = tl.where(left, tl.minimum(a, 0.0),
                       tl.where(right, tl.minimum(nb, 0.0), tl.minimum(a, 0.0) + tl.minimum(nb, 0.0) + mid2[None, :, :]))
        arg = tl.where(left, ea, tl.where(right, eb, ea * eb))
        acc += tl.sum(lin - tl.log2(arg), axis=2)
    tl.store(out_ptr + n_offs[:, None] * S_pad + s_offs[None, :], acc * LN2)


@triton.jit
def _logistic_grad_kernel(x_ptr, mean_ptr, inv2_ptr, r_ptr, out_ptr, N_pad, D_pad, TILES_PER_SPLIT, S_pad,
                          BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    x_offs = n_offs[:, None] * D_pad + d_offs[None, :]
    x3 = tl.load(x_ptr + x_offs)[:, None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    s_lo = pid_s * TILES_PER_SPLIT * BLOCK_S
    s_hi = tl.minimum(s_lo + TILES_PER_SPLIT * BLOCK_S, S_pad)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        p_offs = s_offs[:, None] * D_pad + d_offs[None, :]
        mu = tl.load(mean_ptr + p_offs)
        inv3 = tl.load(inv2_ptr + p_offs)[None, :, :]  # padding: 0 -> adds 0
        r = tl.load(r_ptr + s_offs)
        xm = x3 - mu[None, :, :]
        a = (xm + HALF_BIN) * inv3
        b = (xm - HALF_BIN) * inv3
        ea = tl.exp2(-tl.abs(a))  # sigmoid(-a) from 2^-|a|: never overflows
        eb = tl.exp2(-tl.abs(b))
        sa = tl.where(a >= 0, ea, 1.0) / (1.0 + ea)  # sigmoid(-a)
        sb = tl.where(b >= 0, 1.0, eb) / (1.0 + eb)  # sigmoid(b)
        g = inv3 * tl.where(x3 < HALF_BIN, sa, tl.where(x3 > 1.0 - HALF_BIN, -sb, sa - sb))
        acc += tl.sum(g * r[None, :, None], axis=1)
    out_offs = (pid_s * N_pad + n_offs[:, None]) * D_pad + d_offs[None, :]
    tl.store(out_ptr + out_offs, acc * LN2)  # inv2 = log2(e) inv: one LN2 brings it back
