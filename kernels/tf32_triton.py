"""3xTF32 helpers shared by the mixture kernels: fp32 accuracy from tf32 tensor cores.

x = hi + lo with hi exactly representable in tf32; a . b is then lo_a . hi_b + hi_a . lo_b + hi_a . hi_b
(the dropped lo . lo term and the tf32 rounding of lo are ~2^-22 |a||b| each; ``tiling.tf32_split`` is
the same split in torch, and tests/test_kernels_mixture.py checks the bound by emulation).
"""
import triton
import triton.language as tl


@triton.jit
def _tf32_hi(x):
    """The tf32-exact high part of x (round to nearest, 10-bit mantissa): tiling.tf32_split's bits."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _split_tf32(x):
    """x = hi + lo with hi exactly representable in tf32."""
    hi = _tf32_hi(x)
    return hi, x - hi


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc, PRECISION: tl.constexpr):
    """acc + a @ b as three chained tf32 products (3xTF32), small terms first. PRECISION 'ieee'
    (interpreter, ROCm) computes the same three products in fp32."""
    acc = tl.dot(a_lo, b_hi, acc, input_precision=PRECISION)
    acc = tl.dot(a_hi, b_lo, acc, input_precision=PRECISION)
    return tl.dot(a_hi, b_hi, acc, input_precision=PRECISION)
