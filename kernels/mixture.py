"""Mixture-of-Gaussians log-density: launchers, custom op + autograd, public entry point.

    out[b] = LSE_m( log_weights[m] + log N(z[b]; means[m], diag(exp(log_var[m]))) )

Layout of this file (Liger-Kernel style):

0. Triton kernels: in :mod:`kernels.mixture_triton`, imported on first use only (Triton
   fixes compile-vs-interpret at its own import, so ``import kernels`` must not import it).
1. Launchers: launch parameters (one entry per GPU architecture in ``ARCHS``, the plans), operand buffers
   and the kernels that fill them, grids, interpreter.
2. ``torch.library`` custom ops ``bype_kernels::mixture_logpdf`` (+ ``_backward``) with a fake
   (meta) implementation and ``register_autograd``, so the op works inside ``torch.compile``; eager
   calls go through a ``torch.autograd.Function`` (less host time per call). Both share one forward
   (``_forward``), one saved state (``_save_for_backward``) and one backward (``_input_grads``).
3. :func:`mixture_logpdf`, the public entry point (shape checks, impl resolution).

The torch path (``impl="torch"``) lives in :mod:`kernels.mixture_reference` and runs the
same maths with torch matmuls on tiles of components.

Longer than the other modules on purpose: like Liger-Kernel's ops, one file holds an op's launchers, its
tile table, its custom op and autograd, so that one reading covers how a call reaches a kernel.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import mixture_reference as ref
from . import tiling
from .dispatch import chosen_by_auto, resolve_impl, with_fallback


LOG_2PI = ref.LOG_2PI
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
MAX_TRITON_K = 128  # columns of L / R (d isotropic, 2d diagonal): bounds registers and shared memory
# The kernels index rows x columns in int32; the partial sums of a split pass hold at most ~2^20 rows
# (8 waves of programs), the operands B_pad or M_pad rows: refuse sizes whose offsets would reach 2^31.
MAX_OFFSET = 2**31 - 2**27
MAX_PAD_ROWS = 1 << 20

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
# Tests lower it to exercise several tiles, splits and padded edges on small shapes.
CPU_BLOCKS = (64, 64)
# Below this many (row, component) pairs a launch has too few 64 x 64 tiles to fill a GPU.
SMALL_WORK = 1 << 21


# B * M <= SMALL_WORK: small tiles, more programs for the training shape (100, 500); the backward tiles
# are halved on their accumulator's side so that two column parts fit without spilling. The same on every arch.
SMALL_TILES = {"fwd": (32, 32, 4), "bwd_z": (32, 16, 4), "bwd_m": (16, 32, 4)}


class Width(NamedTuple):
    """Launch parameters of one kernel at one operand width on one architecture."""
    tiles: tuple[int, int, int]  # (BLOCK_B, BLOCK_M, num_warps) for problems of more than SMALL_WORK pairs
    resident: int                # programs of the kernel an SM runs at once with those tiles
    small_resident: int          # the same with SMALL_TILES (problems of at most SMALL_WORK pairs)


# The split plan's launch parameters: one entry per GPU architecture (its hardware facts: tiling.GPUS), by kernel
# and operand width K (K1 + K2 columns, see _k_parts). Tiles: chosen with `bype bench kernels --compile-report
# sm_90 / sm_80`, the largest with zero spills. The fixed operand's hi and lo parts live in registers for the
# whole loop, so the wide-K backward kernels shrink the non-looped side (docs/KERNELS.md, "Tile table"); the
# two-part widths 48 (32 + 16: isotropic d = 33-48, diagonal d = 17-24) and 80 (64 + 16: diagonal d = 33-40,
# isotropic d = 65-80) hold both parts, and some need smaller tiles than the power of two above them (the kernels
# are the same for both layouts, so are their registers). Resident programs: occupancy from the registers and shared memory that the compile report reads
# from the cubins (tiling.resident_programs), the smaller of Triton 3.9's and 3.6's over the report's shapes
# (checked against fresh compiles by tests/test_kernels_mixture.py); the split count uses them to fill whole
# waves (tiling.split). A width not listed (96 = 64 + 32) takes the tiles of the power of two above it and
# sizes its grids by the program-count rule.
ARCHS = {
    90: {
        "fwd": {16: Width((64, 64, 4), 5, 9), 32: Width((64, 64, 4), 3, 6), 48: Width((64, 64, 4), 2, 6),
                64: Width((64, 64, 4), 1, 4), 80: Width((64, 32, 4), 2, 3), 128: Width((64, 32, 4), 1, 2)},
        "bwd_z": {16: Width((64, 64, 4), 3, 7), 32: Width((64, 64, 4), 2, 5), 48: Width((64, 32, 4), 2, 4),
                  64: Width((64, 64, 4), 2, 4), 80: Width((64, 16, 4), 2, 3), 128: Width((64, 16, 4), 2, 2)},
        "bwd_m": {16: Width((64, 64, 4), 2, 8), 32: Width((64, 64, 4), 2, 4), 48: Width((32, 64, 4), 2, 4),
                  64: Width((32, 64, 4), 2, 4), 80: Width((16, 64, 4), 2, 2), 128: Width((16, 64, 4), 2, 2)},
    },
    80: {  # mma.sync keeps more of each tile in registers than wgmma: smaller backward tiles
        "fwd": {16: Width((64, 64, 4), 6, 9), 32: Width((64, 64, 4), 3, 6), 48: Width((64, 64, 4), 2, 4),
                64: Width((64, 64, 4), 1, 3), 80: Width((64, 32, 4), 2, 2), 128: Width((64, 32, 4), 1, 1)},
        "bwd_z": {16: Width((64, 64, 4), 3, 7), 32: Width((64, 64, 4), 2, 5), 48: Width((32, 32, 4), 2, 4),
                  64: Width((32, 64, 4), 2, 4), 80: Width((32, 16, 4), 2, 3), 128: Width((16, 32, 4), 2, 2)},
        "bwd_m": {16: Width((64, 64, 4), 2, 8), 32: Width((32, 64, 4), 2, 4), 48: Width((32, 64, 4), 2, 4),
                  64: Width((32, 64, 4), 2, 4), 80: Width((16, 32, 4), 2, 3), 128: Width((16, 32, 4), 2, 2)},
    },
}
if set(ARCHS) != set(tiling.GPUS):
    raise ImportError(f"kernels.mixture.ARCHS covers sm {sorted(ARCHS)}, kernels.tiling.GPUS sm {sorted(tiling.GPUS)}")


def large_tiles(arch: int, kernel: str, K: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_M, num_warps) of a kernel above SMALL_WORK pairs: the entry of width K, else of the power
    of two above it."""
    widths = ARCHS[arch][kernel]
    return (widths.get(K) or widths[tiling.pow2_at_least(K)]).tiles


def resident_programs(kernel: str, B: int, M: int, K: int, target: tiling.Target) -> int:
    """Tabulated programs per SM of one mixture kernel; 0 (unknown: grids sized by program count alone)
    off CUDA, on archs other than the tabulated ones (whose SMs hold other amounts) and at widths not listed."""
    if not target.cuda or target.arch not in ARCHS:
        return 0
    width = ARCHS[target.arch][kernel].get(K)
    if width is None:
        return 0
    return width.small_resident if B * M <= SMALL_WORK else width.resident


def tile_config(kernel: str, B: int, M: int, K: int, target: tiling.Target) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_M, num_warps, num_stages) of one mixture kernel ('fwd', 'bwd_z', 'bwd_m') whose
    operand rows are K floats (both column parts, see _k_parts): SMALL_TILES up to SMALL_WORK pairs, else
    :func:`large_tiles` of the architecture the device uses (tiling.table_arch).

    Three pipeline stages where the hi + lo tiles of the looped-over operand fit shared memory
    three times over next to the fixed operand (sm_80: 163 KiB, sm_90: 227 KiB per block), else
    two (no entry of the table needs two today)."""
    if not target.cuda:
        return CPU_BLOCKS[0], CPU_BLOCKS[1], 1, 1
    arch = tiling.table_arch(target)
    bb, bm, warps = SMALL_TILES[kernel] if B * M <= SMALL_WORK else large_tiles(arch, kernel, K)
    loop_rows, fixed_rows = (bb, bm) if kernel == "bwd_m" else (bm, bb)
    per_stage = 2 * loop_rows * K * 4
    # sm_90 (wgmma) reads the fixed operand from shared memory; sm_80 keeps it in registers and
    # needs one buffer more than it has stages (measured by the compile report)
    fixed = 2 * fixed_rows * K * 4 if arch >= 90 else per_stage
    stages = 3 if fixed + 3 * per_stage <= tiling.GPUS[arch].shared_per_block else 2
    return bb, bm, warps, stages


def _precision(target: tiling.Target) -> str:
    # 3xTF32 (hi/lo parts split once per pass by the preparation kernels, three chained tf32 dots)
    # keeps ~fp32 accuracy on tensor cores; plain tf32 (10-bit mantissa) would ruin the distances. The
    # interpreter (and ROCm) compute the same three dots in ieee fp32.
    return "tf32" if (target.cuda and torch.version.hip is None) else "ieee"


@dataclass
class _Operands:
    """Kernel operands (see kernels/mixture_triton.py), rows padded to the tiles, built on the device by
    the preparation kernels (kernels/mixture_prep_triton.py) from the inputs kept here."""
    mode: str
    B: int
    M: int
    d: int
    K: int          # row width of L and R: K1 + K2 columns (see _k_parts)
    K1: int
    B_pad: int
    M_pad: int
    z: Tensor       # the inputs, as given (strided rows; any float dtype)
    means: Tensor
    log_weights: Tensor
    log_var: Tensor
    centre: Tensor  # fp32 [d]: the mean of the means (the density is shift invariant)
    l_hi: Tensor    # [B_pad, K]
    l_lo: Tensor
    r_hi: Tensor    # [M_pad, K]
    r_lo: Tensor
    zz: Tensor      # [B_pad]
    c2: Tensor      # [M_pad] log2 units, -inf padding
    p2: Tensor
    q: Tensor
    w: Tensor       # responsibility weight of grad z: p (isotropic) or 1 (diagonal)
    lse2: Optional[Tensor] = None  # backward: [B_pad] log2-sum-exp (+inf: zero density or padding)
    g: Optional[Tensor] = None     # backward: [B_pad] upstream gradient (0 there)

    @property
    def lv_stride(self) -> int:
        return _lv_stride(self.log_var, self.mode)

    @property
    def block_d(self) -> int:
        """Columns of a [rows, d] tile in the row-pass kernels."""
        return tiling.pow2_at_least(self.d, 1)


# Plans of the Triton path. 'fused': one kernel per pass (kernels/mixture_fused_triton.py), for problems small
# enough that each loop of it is at most FUSED_LOOP_TILES tiles (B <= 256, M <= 512: the training shape
# (100, 500) is 7 row tiles and 16 component tiles), where a call is launch bound. 'split': operands prepared
# once, tiled passes split over the device, splits combined (everything larger).
FUSED_TILES = (16, 32)  # (BLOCK_B, BLOCK_M)
FUSED_LOOP_TILES = 16
# (num_warps, num_stages) of the fused kernels: the settings with 0 spill bytes in both kernels for d in
# {16, 40, 64}, isotropic and diagonal, sm_80 and sm_90, Triton 3.6 and 3.9 (compile report); 4 warps spill
# 16-32 B in the backward at d = 40, 8 warps with 2 stages 8 B in one forward, with 3 stages 8 B in one backward.
FUSED_LAUNCH = {"fwd": (8, 3), "bwd": (8, 2)}
PLAN_ENV = "BYPE_MIXTURE_PLAN"  # auto (default) | fused | split
PLANS = ("fused", "split")


def triton_plan(B: int, M: int) -> str:
    """The Triton path's plan for a [B rows, M components] problem: 'fused' or 'split' (see above);
    ``BYPE_MIXTURE_PLAN=fused|split`` overrides the choice (A/B timings, tests)."""
    env = os.environ.get(PLAN_ENV, "auto").strip().lower() or "auto"
    if env in PLANS:
        return env
    if env != "auto":
        raise ValueError(f"{PLAN_ENV}={env!r}: expected 'auto', 'fused' or 'split'")
    bb, bm = FUSED_TILES
    return "fused" if max(tiling.cdiv(B, bb), tiling.cdiv(M, bm)) <= FUSED_LOOP_TILES else "split"


def _lv_stride(log_var: Tensor, mode: str) -> int:
    """Row stride of a diagonal log-variance (0 for the isotropic modes, read per row or once)."""
    return log_var.stride(0) if mode == "diag" else 0


PREP_ROWS = 16  # rows per program of the preparation / combination kernels (every tile is a multiple)
LV_MODES = {"shared": 0, "component": 1, "diag": 2}


def _k_parts(mode: str, d: int) -> tuple[int, int]:
    """The columns of L and R (d isotropic, 2d diagonal) as one or two parts, each a power of two >= 16
    (what tl.dot takes): 40 -> (32, 16), 48 columns instead of 64; 80 -> (64, 16); 64 -> (64, 0).
    Two parts only where they save columns over one power of two."""
    cols = (2 if mode == "diag" else 1) * d
    whole = tiling.pow2_at_least(cols)
    first = max(16, 1 << (cols.bit_length() - 1))
    if cols <= first:
        return whole, 0
    second = tiling.pow2_at_least(cols - first)
    return (first, second) if first + second < whole else (whole, 0)


def _k_of(mode: str, d: int) -> int:
    """Row width of L and R in floats: both column parts."""
    return sum(_k_parts(mode, d))


def _padding(B: int, M: int, K: int, target: tiling.Target) -> tuple[int, int]:
    """Row counts that every kernel's tiles divide (tiles are powers of two, >= PREP_ROWS)."""
    cfgs = [tile_config(k, B, M, K, target) for k in ("fwd", "bwd_z", "bwd_m")]
    pb = max(PREP_ROWS, *(c[0] for c in cfgs))
    pm = max(PREP_ROWS, *(c[1] for c in cfgs))
    return tiling.cdiv(max(B, 1), pb) * pb, tiling.cdiv(M, pm) * pm


def _rows_meta(target: tiling.Target, **constexprs) -> dict:
    return dict(BLOCK_R=PREP_ROWS, num_warps=4 if target.cuda else 1, **constexprs)


def _inputs_contiguous(*ts: Tensor) -> tuple[Tensor, ...]:
    # the kernels read rows with unit column stride: a no-op, no launch, for the usual inputs
    return tuple(t.detach().contiguous() for t in ts)


def _operands(z, means, log_weights, log_var, target: tiling.Target, out: Optional[Tensor] = None,
              grad: Optional[Tensor] = None) -> tuple[_Operands, list[tiling.Launch]]:
    """The operands' buffers and the two launches that fill them (rows of z, components); with ``out``
    (the forward's fp32 log-density) and ``grad`` the rows' launch also writes the backward's lse2, g."""
    B, d = z.shape
    M = means.shape[0]
    mode = ref.log_var_mode(log_var)
    K1, K2 = _k_parts(mode, d)
    K = K1 + K2
    B_pad, M_pad = _padding(B, M, K, target)
    f32 = dict(dtype=torch.float32, device=z.device)
    # the centre from the contiguous means, so that results do not depend on the input's memory layout
    z, means, log_weights, log_var = _inputs_contiguous(z, means, log_weights, log_var)
    centre = means.float().mean(0)
    backward = out is not None
    ops = _Operands(mode, B, M, d, K, K1, B_pad, M_pad, z, means, log_weights, log_var, centre,
                    *(torch.empty(B_pad, K, **f32) for _ in range(2)),
                    *(torch.empty(M_pad, K, **f32) for _ in range(2)),
                    torch.empty(B_pad, **f32), *(torch.empty(M_pad, **f32) for _ in range(4)),
                    *((torch.empty(B_pad, **f32), torch.empty(B_pad, **f32)) if backward else (None, None)))
    # the forward passes zz for the backward-only pointers, which BACKWARD=False never touches
    rows_backward = (out, grad.detach().contiguous(), ops.lse2, ops.g) if backward else (ops.zz,) * 4
    rows = tiling.Launch("_mixture_prep_rows_kernel", (B_pad // PREP_ROWS,),
                         (ops.z, centre, ops.l_hi, ops.l_lo, ops.zz, *rows_backward, B, d, ops.z.stride(0)),
                         _rows_meta(target, DIAG=mode == "diag", BACKWARD=backward, KW=K,
                                    BLOCK_K=tiling.pow2_at_least(K)))
    components = tiling.Launch("_mixture_prep_components_kernel", (M_pad // PREP_ROWS,),
                               (ops.means, centre, ops.log_weights, ops.log_var, ops.r_hi, ops.r_lo, ops.c2, ops.p2,
                                ops.q, ops.w, M, d, ops.means.stride(0), ops.lv_stride),
                               _rows_meta(target, LV_MODE=LV_MODES[mode], KW=K, BLOCK_K=tiling.pow2_at_least(K),
                                          BLOCK_D=ops.block_d))
    return ops, [rows, components]


def _meta(kernel: str, ops: _Operands, target: tiling.Target) -> dict:
    bb, bm, warps, stages = tile_config(kernel, ops.B, ops.M, ops.K, target)
    return dict(BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=ops.K1, BLOCK_K2=ops.K - ops.K1, PRECISION=_precision(target),
                num_warps=warps, num_stages=stages)


def _launch(kernel: str, ops: _Operands, target: tiling.Target, inputs: tuple, parts: list[tuple]):
    """One mixture kernel call: programs over tiles of z rows ('fwd', 'bwd_z') or of components
    ('bwd_m'), the other side looped over and split until the grid fills the device. Returns
    the Launch and its partial outputs, [splits, padded rows, *shape] for each shape in parts."""
    meta = _meta(kernel, ops, target)
    b_tiles, m_tiles = ops.B_pad // meta["BLOCK_B"], ops.M_pad // meta["BLOCK_M"]
    over_rows = kernel != "bwd_m"
    tiles, loop_tiles = (b_tiles, m_tiles) if over_rows else (m_tiles, b_tiles)
    splits, per = tiling.split(loop_tiles, tiles, target, resident_programs(kernel, ops.B, ops.M, ops.K, target))
    rows = ops.B_pad if over_rows else ops.M_pad
    outs = [ops.zz.new_empty(splits, rows, *shape) for shape in parts]
    args = (ops.l_hi, ops.l_lo, ops.r_hi, ops.r_lo, ops.zz, ops.c2, ops.p2, ops.q, *inputs, *outs,
            ops.B_pad, ops.M_pad, per)
    return tiling.Launch(f"_mixture_{kernel}_kernel", (tiles, splits), args, meta), outs


def forward_launches(ops: _Operands, target: tiling.Target) -> tuple[list[tiling.Launch], Tensor]:
    """The forward kernel (partial max and sum of 2^s2 per split and row) and the combination of its
    splits into the fp32 log-density [B], which it returns."""
    fwd, (pmax, psum) = _launch("fwd", ops, target, (), [(), ()])
    lse = ops.zz.new_empty(ops.B)
    combine = tiling.Launch("_mixture_combine_fwd_kernel", (ops.B_pad // PREP_ROWS,),
                            (pmax, psum, lse, ops.B, ops.B_pad, pmax.shape[0]), _rows_meta(target))
    return [fwd, combine], lse


def backward_z_launches(ops: _Operands, target: tiling.Target) -> tuple[list[tiling.Launch], Tensor]:
    """The z-backward kernel (partial sum_m G w R[m] [.., K] and sum_m G w per split and row) and its
    finish into grad z, fp32 [B, d], which it returns."""
    bwd, (py, pr) = _launch("bwd_z", ops, target, (ops.w, ops.lse2, ops.g), [(ops.K,), ()])
    gz = ops.zz.new_empty(ops.B, ops.d)
    finish = tiling.Launch("_mixture_finish_z_kernel", (ops.B_pad // PREP_ROWS,),
                           (py, pr, ops.z, ops.centre, gz, ops.B, ops.B_pad, ops.d, ops.z.stride(0), py.shape[0]),
                           _rows_meta(target, DIAG=ops.mode == "diag", KW=ops.K, BLOCK_D=ops.block_d))
    return [bwd, finish], gz


def backward_m_launches(ops: _Operands, target: tiling.Target) -> tuple[list[tiling.Launch], tuple]:
    """The component backward (partial sum_b G L[b] [.., K], sum_b G, sum_b G d2 per split and component)
    and its finish into fp32 grads of means [M, d], log_weights [M], log_var ([M] or [M, d] per row)."""
    bwd, (px, pcs, pgd) = _launch("bwd_m", ops, target, (ops.lse2, ops.g), [(ops.K,), (), ()])
    gm, gw = ops.zz.new_empty(ops.M, ops.d), ops.zz.new_empty(ops.M)
    glv = ops.zz.new_empty(ops.M, ops.d) if ops.mode == "diag" else ops.zz.new_empty(ops.M)
    finish = tiling.Launch("_mixture_finish_m_kernel", (ops.M_pad // PREP_ROWS,),
                           (px, pcs, pgd, ops.means, ops.centre, ops.log_var, gm, gw, glv, ops.M, ops.M_pad, ops.d,
                            ops.means.stride(0), ops.lv_stride, px.shape[0]),
                           _rows_meta(target, LV_MODE=LV_MODES[ops.mode], KW=ops.K, BLOCK_D=ops.block_d))
    return [bwd, finish], (gm, gw, glv)


def _fused_meta(kernel: str, mode: str, d: int, target: tiling.Target) -> dict:
    bb, bm = FUSED_TILES
    warps, stages = FUSED_LAUNCH[kernel]
    return dict(LV_MODE=LV_MODES[mode], BLOCK_B=bb, BLOCK_M=bm, BLOCK_D=tiling.pow2_at_least(d),
                PRECISION=_precision(target), num_warps=warps if target.cuda else 1, num_stages=stages)


def fused_forward_launch(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor, out: Tensor, lse: Tensor,
                         target: tiling.Target) -> tiling.Launch:
    """The fused forward: log-density into ``out`` (any float dtype) and ``lse`` (fp32), both [B]."""
    (B, d), M, mode = z.shape, means.shape[0], ref.log_var_mode(log_var)
    lv_stride = _lv_stride(log_var, mode)
    return tiling.Launch("_mixture_fused_fwd_kernel", (tiling.cdiv(B, FUSED_TILES[0]),),
                         (z, means, log_weights, log_var, out, lse, B, M, d, z.stride(0), means.stride(0), lv_stride),
                         _fused_meta("fwd", mode, d, target))


def fused_backward_launch(grad: Tensor, z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor, lse: Tensor,
                          grads: tuple, need_z: bool, need_components: bool, target: tiling.Target) -> tiling.Launch:
    """The fused backward into ``grads`` = (gz [B, d], gm [M, d], gw [M], glv [M] or [M, d]): programs over
    z-row tiles (when ``need_z``), then over component tiles (when ``need_components``)."""
    (B, d), M, mode = z.shape, means.shape[0], ref.log_var_mode(log_var)
    lv_stride = _lv_stride(log_var, mode)
    bb, bm = FUSED_TILES
    z_programs = tiling.cdiv(B, bb) if need_z else 0
    m_programs = tiling.cdiv(M, bm) if need_components else 0
    return tiling.Launch("_mixture_fused_bwd_kernel", (z_programs + m_programs,),
                         (grad, z, means, log_weights, log_var, lse, *grads, B, M, d, grad.stride(0), z.stride(0),
                          means.stride(0), lv_stride, z_programs), _fused_meta("bwd", mode, d, target))


def _fused_grads(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor) -> tuple:
    """Gradient buffers of the fused backward in the inputs' dtypes (a shared log-variance's per-component
    terms in fp32, summed by the host)."""
    glv = log_var.new_empty(log_var.shape) if log_var.dim() else log_var.new_empty(means.shape[0], dtype=torch.float32)
    return z.new_empty(z.shape), means.new_empty(means.shape), log_weights.new_empty(log_weights.shape), glv


def all_launches(B: int, M: int, d: int, mode: str, target: tiling.Target, plan: Optional[str] = None
                 ) -> list[tiling.Launch]:
    """Every kernel call of one forward + backward at these sizes under ``plan`` (default: the one
    :func:`triton_plan` picks), built on the meta device (no memory, no GPU): what ``bype bench kernels
    --compile-report`` compiles."""
    meta_dev = torch.device("meta")
    z = torch.empty(B, d, device=meta_dev)
    means = torch.empty(M, d, device=meta_dev)
    lv = torch.empty({"shared": (), "component": (M,), "diag": (M, d)}[mode], device=meta_dev)
    lw = torch.empty(M, device=meta_dev)
    if (plan or triton_plan(B, M)) == "fused":
        lse = torch.empty(B, device=meta_dev)
        return [fused_forward_launch(z, means, lw, lv, lse, lse, target),
                fused_backward_launch(lse, z, means, lw, lv, lse, _fused_grads(z, means, lw, lv), True, True, target)]
    ops, prep = _operands(z, means, lw, lv, target)
    fwd, lse = forward_launches(ops, target)
    bops, bprep = _operands(z, means, lw, lv, target, out=lse, grad=torch.empty(B, device=meta_dev))
    return [*prep, *fwd, *bprep, *backward_z_launches(bops, target)[0], *backward_m_launches(bops, target)[0]]


def _run(launch: tiling.Launch, device: torch.device) -> None:
    getattr(_triton_module(device), launch.kernel)[launch.grid](*launch.args, **launch.meta)


def _run_all(launches: list[tiling.Launch], device: torch.device) -> None:
    for launch in launches:
        _run(launch, device)


def triton_forward(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Forward on the Triton path: (the log-density [B] in ``out_dtype``, default fp32; the fp32 log-density
    the backward reads). Fused plan: one launch. Split plan: two preparation kernels, the forward, the
    combination of its splits (and a copy into ``out_dtype``)."""
    B = z.shape[0]
    out_dtype = out_dtype or torch.float32
    if B == 0:
        return (torch.empty(0, dtype=out_dtype, device=z.device), torch.empty(0, dtype=torch.float32, device=z.device))
    target = tiling.target_for(z.device)
    if triton_plan(B, means.shape[0]) == "fused":
        z, means, log_weights, log_var = _inputs_contiguous(z, means, log_weights, log_var)
        lse = torch.empty(B, dtype=torch.float32, device=z.device)
        out = torch.empty(B, dtype=out_dtype, device=z.device)
        _run(fused_forward_launch(z, means, log_weights, log_var, out, lse, target), z.device)
        return out, lse
    ops, prep = _operands(z, means, log_weights, log_var, target)
    fwd, lse = forward_launches(ops, target)
    _run_all([*prep, *fwd], z.device)
    return lse.to(out_dtype, copy=True), lse


def triton_backward(grad: Tensor, z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor,
                    out: Tensor, need_z: bool = True, need_components: bool = True):
    """Gradients of (z, means, log_weights, log_var) from the upstream ``grad`` and the forward's fp32
    log-density ``out``. Fused plan: one launch (programs of the sides needed). Split plan: two preparation
    kernels, then per side needed its backward kernel and the kernel that finishes its gradients from the splits.

        dz_b  = sum_m G_bm w_m (R-side terms)   dm_m = p_m (sum_b G z_b - cs_m m_m)   dlog_w = cs = sum_b G
        dlv_m = -d/2 cs_m + p_m/2 sum_b G |z_b - m_m|^2      (diag: per coordinate)
    """
    B, d = z.shape
    M = means.shape[0]
    gz = gm = gw = glv = None
    if B > 0 and (need_z or need_components):
        target = tiling.target_for(z.device)
        out = out.detach().float()
        if triton_plan(B, M) == "fused":
            z, means, log_weights, log_var = _inputs_contiguous(z, means, log_weights, log_var)
            grads = _fused_grads(z, means, log_weights, log_var)
            _run(fused_backward_launch(grad, z, means, log_weights, log_var, out, grads, need_z, need_components,
                                       target), z.device)
            gz, gm, gw, glv = (g if need else None for g, need in zip(grads, (need_z, *(need_components,) * 3)))
        else:
            ops, launches = _operands(z, means, log_weights, log_var, target, out=out, grad=grad)
            if need_z:
                side, gz = backward_z_launches(ops, target)
                launches += side
            if need_components:
                side, (gm, gw, glv) = backward_m_launches(ops, target)
                launches += side
            _run_all(launches, z.device)
        if glv is not None and log_var.dim() == 0:  # a shared log-variance: the per-component terms summed
            glv = glv.sum()
    # gradients not asked for: zeros (the autograd wrapper drops them)
    gz = torch.zeros(B, d, device=z.device) if gz is None else gz
    gm = torch.zeros(M, d, device=z.device) if gm is None else gm
    gw = torch.zeros(M, device=z.device) if gw is None else gw
    glv = torch.zeros(log_var.shape, device=z.device) if glv is None else glv
    return (gz.to(z.dtype), gm.to(means.dtype), gw.to(log_weights.dtype), glv.to(log_var.dtype))


# ========================================================================================
# 2. Custom ops (torch.compile sees one opaque node for forward and one for backward)
# ========================================================================================
def _out_dtype(*ts: Tensor) -> torch.dtype:
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


OP = "mixture_logpdf"
# impl values of the ops: "torch", "triton" (explicit: a Triton error is raised) and AUTO_TRITON (Triton chosen by
# impl="auto": a Triton error switches the op to the torch path, kernels/dispatch.py `with_fallback`).
AUTO_TRITON = "auto_triton"
TRITON_IMPLS = ("triton", AUTO_TRITON)


def _autocast_off(device: torch.device):
    """Autocast off inside the torch path: it would run its products in bf16, and the distances
    |z|^2 + |m|^2 - 2 z.m cancel (about a nat per score at the training scale). The op computes in its
    inputs' promoted dtype, as documented (the Triton kernels compute in fp32 whatever autocast says)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _forward(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor, impl: str, chunk: int
             ) -> tuple[Tensor, Tensor]:
    """(out in the promoted input dtype, lse in fp32/fp64). The backward reads lse: a bf16-rounded output
    would shift every responsibility exp(s - out) by up to |out| 2^-9."""
    out_dtype = _out_dtype(z, means, log_weights, log_var)

    def torch_path():
        with _autocast_off(z.device):
            lse = ref.chunked_forward(z, means, log_weights, log_var, chunk)
        return lse.to(out_dtype, copy=True), lse

    if impl in TRITON_IMPLS:
        return with_fallback(OP, impl == AUTO_TRITON,
                             lambda: triton_forward(z, means, log_weights, log_var, out_dtype), torch_path)
    return torch_path()


def _gradients(grad: Tensor, z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor, out: Tensor,
               impl: str, chunk: int, need_z: bool, need_components: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contiguous gradients of (z, means, log_weights, log_var); the Triton path skips the
    kernel of a side (z / components) whose gradient is not needed and returns zeros there."""
    def torch_path():
        with _autocast_off(z.device):  # a backward run inside an autocast region (CPU: the same thread) too
            grads = ref.chunked_backward(grad, z, means, log_weights, log_var, out, chunk)
        return tuple(t.contiguous() for t in grads)

    if impl in TRITON_IMPLS:  # the torch backward reads the same fp32 lse
        return with_fallback(OP, impl == AUTO_TRITON, lambda: triton_backward(
            grad, z, means, log_weights, log_var, out, need_z, need_components), torch_path)
    return torch_path()


@torch.library.custom_op("bype_kernels::mixture_logpdf", mutates_args=())
def _mixture_logpdf_op(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor,
                       impl: str, chunk: int) -> tuple[Tensor, Tensor]:
    """:func:`_forward` as an op torch.compile can trace: returns (out, lse)."""
    return _forward(z, means, log_weights, log_var, impl, chunk)


@_mixture_logpdf_op.register_fake
def _(z, means, log_weights, log_var, impl, chunk):
    lse_dtype = ref.compute_dtype(z, means, log_weights, log_var) if impl not in TRITON_IMPLS else torch.float32
    return (z.new_empty((z.shape[0],), dtype=_out_dtype(z, means, log_weights, log_var)),
            z.new_empty((z.shape[0],), dtype=lse_dtype))


@torch.library.custom_op("bype_kernels::mixture_logpdf_backward", mutates_args=())
def _mixture_logpdf_backward_op(grad: Tensor, z: Tensor, means: Tensor, log_weights: Tensor,
                                log_var: Tensor, out: Tensor, impl: str, chunk: int,
                                need_z: bool, need_components: bool
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_gradients` as an op torch.compile can trace."""
    return _gradients(grad, z, means, log_weights, log_var, out, impl, chunk, need_z, need_components)


@_mixture_logpdf_backward_op.register_fake
def _(grad, z, means, log_weights, log_var, out, impl, chunk, need_z, need_components):
    # new_empty: contiguous like the real op (empty_like would copy input strides)
    return (z.new_empty(z.shape), means.new_empty(means.shape), log_weights.new_empty(log_weights.shape),
            log_var.new_empty(log_var.shape))


# Two autograd entries, one implementation: the custom op (torch.compile) and _EagerMixtureLogpdf (eager calls)
# both run _forward, keep the same saved state through _save_for_backward and get their gradients through
# _input_grads.
def _save_for_backward(ctx, inputs: tuple, lse: Tensor) -> None:
    """What the backward reads: the four input tensors, the forward's fp32 (fp64) log-sum-exp, impl and chunk."""
    z, means, log_weights, log_var, impl, chunk = inputs
    ctx.save_for_backward(z, means, log_weights, log_var, lse)
    ctx.impl, ctx.chunk = impl, chunk


def _input_grads(ctx, grad: Tensor, through_op: bool) -> tuple:
    """Gradients of the op's inputs from the state :func:`_save_for_backward` kept: those asked for, None for the
    rest and for impl and chunk. ``through_op``: computed by the backward custom op (what torch.compile traces, and
    what refuses a second derivative by name), else by its body :func:`_gradients` directly."""
    z, means, log_weights, log_var, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads_of = _mixture_logpdf_backward_op if through_op else _gradients
    gz, gm, gw, glv = grads_of(grad, z, means, log_weights, log_var, lse, ctx.impl, ctx.chunk,
                               bool(need[0]), any(need[1:4]))
    return (gz if need[0] else None, gm if need[1] else None, gw if need[2] else None,
            glv if need[3] else None, None, None)


def _setup_context(ctx, inputs, output):
    _save_for_backward(ctx, inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_lse):
    return _input_grads(ctx, grad, through_op=True)


_mixture_logpdf_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerMixtureLogpdf(torch.autograd.Function):
    """The custom ops' forward and backward for eager calls. torch.library's dispatch and its autograd wrapper
    cost ~40 us of host time per forward + backward, more than the fused kernels' own host code, on a call
    that is launch bound at the training shape; under torch.compile the custom ops are traced instead."""

    @staticmethod
    def forward(ctx, z, means, log_weights, log_var, impl, chunk):
        inputs = (z, means, log_weights, log_var, impl, chunk)
        out, lse = _forward(*inputs)
        _save_for_backward(ctx, inputs, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        # First-order gradients only. Under create_graph=True go through the backward op, whose outputs refuse
        # a second derivative by name (no autograd formula registered) instead of passing as constants.
        return _input_grads(ctx, grad, through_op=torch.is_grad_enabled())


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
    if impl == "triton":
        why = _triton_unsupported(z, means, log_weights, log_var)
        if why and requested == "auto":
            impl = "torch"  # auto falls back quietly to the torch path, which handles both
        elif why:
            raise ValueError(f"mixture_logpdf: impl='triton' {why}; use impl='torch'")
        elif chosen_by_auto(requested):
            impl = AUTO_TRITON  # a Triton failure, now or earlier in the process, takes the torch path
    if torch.compiler.is_compiling():
        return _mixture_logpdf_op(z, means, log_weights, log_var, impl, int(chunk))[0]
    return _EagerMixtureLogpdf.apply(z, means, log_weights, log_var, impl, int(chunk))


def _triton_unsupported(z: Tensor, means: Tensor, log_weights: Tensor, log_var: Tensor) -> str:
    """Why the Triton path cannot compute this call as documented ('' if it can)."""
    mode = ref.log_var_mode(log_var)
    if _k_of(mode, z.shape[1]) > MAX_TRITON_K:
        limit = MAX_TRITON_K // (2 if mode == "diag" else 1)
        return f"supports d <= {limit} with {mode} log_var, got z shape {tuple(z.shape)}"
    if ref.compute_dtype(z, means, log_weights, log_var) == torch.float64:
        return "computes in float32, got float64 inputs (the torch path computes in float64)"
    rows = max(z.shape[0], means.shape[0]) + MAX_PAD_ROWS
    if rows * _k_of(mode, z.shape[1]) >= MAX_OFFSET:
        return (f"indexes its operands with 32-bit offsets: {rows} padded rows x {_k_of(mode, z.shape[1])} "
                f"columns reach 2^31 (z shape {tuple(z.shape)}, means shape {tuple(means.shape)})")
    return ""
