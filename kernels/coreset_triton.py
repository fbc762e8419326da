"""Triton kernels of the discretised-logistic coreset gradient (see :mod:`kernels.coreset_grads`).

Imported lazily (like :mod:`kernels.mixture_triton`) so ``import kernels`` never imports triton.

* ``_logistic_pairwise_kernel``: ``out[n, s] = sum_d log p(x_nd | mean_sd, scale_sd)``, one
  program per (n-tile, s-tile), looping over pixel tiles: the ``n x s x d`` cube only ever
  exists one ``[BLOCK_N, BLOCK_S, BLOCK_D]`` register tile at a time.
* ``_logistic_grad_kernel``: ``out[n, d] = sum_s (d/dx) log p(x_nd | theta_sd) * r_s``, one
  program per (n-tile, d-tile), looping over sample tiles.

The host passes ``inv = exp(-log_scale)`` and ``mid = log(-expm1(-2h inv))`` per (s, d): the
last term of the middle-bin formula does not depend on x, and torch's expm1 keeps it exact
for wide scales where ``1 - exp(-t)`` would cancel.
"""
import triton
import triton.language as tl

HALF_BIN = tl.constexpr(1.0 / 510.0)  # a plain global would not compile (interpreter accepts it)


@triton.jit
def _logsigmoid(t):
    # min(t, 0) - log(1 + e^-|t|): no overflow; the lost log1p digits are < 1 ulp of the sum
    return tl.minimum(t, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(t)))


@triton.jit
def _sigmoid(t):
    e = tl.exp(-tl.abs(t))  # never overflows (tl.sigmoid's exp(-t) does for t << 0)
    return tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _logistic_pairwise_kernel(x_ptr, mean_ptr, inv_ptr, mid_ptr, out_ptr, N, S, D,
                              stride_x, stride_p, stride_out,
                              BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s_offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    n_mask = n_offs < N
    s_mask = s_offs < S
    acc = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        d_mask = d_offs < D
        x = tl.load(x_ptr + n_offs[:, None] * stride_x + d_offs[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.5)
        pm = s_mask[:, None] & d_mask[None, :]
        p_offs = s_offs[:, None] * stride_p + d_offs[None, :]
        mu = tl.load(mean_ptr + p_offs, mask=pm, other=0.0)
        inv = tl.load(inv_ptr + p_offs, mask=pm, other=1.0)
        mid = tl.load(mid_ptr + p_offs, mask=pm, other=0.0)
        x3 = x[:, None, :]
        inv3 = inv[None, :, :]
        xm = x3 - mu[None, :, :]
        lsa = _logsigmoid((xm + HALF_BIN) * inv3)
        lsnb = _logsigmoid(-(xm - HALF_BIN) * inv3)
        lp = tl.where(x3 < HALF_BIN, lsa, tl.where(x3 > 1.0 - HALF_BIN, lsnb, lsa + lsnb + mid[None, :, :]))
        lp = tl.where(d_mask[None, None, :], lp, 0.0)
        acc += tl.sum(lp, axis=2)
    tl.store(out_ptr + n_offs[:, None] * stride_out + s_offs[None, :], acc,
             mask=n_mask[:, None] & s_mask[None, :])


@triton.jit
def _logistic_grad_kernel(x_ptr, mean_ptr, inv_ptr, r_ptr, out_ptr, N, S, D,
                          stride_x, stride_p,
                          BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = n_offs < N
    d_mask = d_offs < D
    xmask = n_mask[:, None] & d_mask[None, :]
    x = tl.load(x_ptr + n_offs[:, None] * stride_x + d_offs[None, :], mask=xmask, other=0.5)
    x3 = x[:, None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        s_mask = s_offs < S
        pm = s_mask[:, None] & d_mask[None, :]
        p_offs = s_offs[:, None] * stride_p + d_offs[None, :]
        mu = tl.load(mean_ptr + p_offs, mask=pm, other=0.0)
        inv = tl.load(inv_ptr + p_offs, mask=pm, other=0.0)  # 0 -> masked samples add 0
        r = tl.load(r_ptr + s_offs, mask=s_mask, other=0.0)
        inv3 = inv[None, :, :]
        xm = x3 - mu[None, :, :]
        sa = _sigmoid(-(xm + HALF_BIN) * inv3)
        sb = _sigmoid((xm - HALF_BIN) * inv3)
        g = inv3 * tl.where(x3 < HALF_BIN, sa, tl.where(x3 > 1.0 - HALF_BIN, -sb, sa - sb))
        acc += tl.sum(g * r[None, :, None], axis=1)
    tl.store(out_ptr + n_offs[:, None] * D + d_offs[None, :], acc, mask=xmask)
