"""Launch geometry shared by the Triton launchers: target GPUs, grid splitting, tf32 split.

A launcher describes each kernel call as a :class:`Launch` (kernel name, grid, arguments,
compile options) before running it, so that ``bype bench kernels --compile-report`` can compile
exactly the same calls offline for another GPU (no device needed).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Gpu:
    """Hardware facts of one GPU architecture that launch parameters are written for. The per-SM limits
    decide how many programs run at once (CUDA occupancy); registers are allocated per warp in units of 256."""
    sms: int                # streaming multiprocessors of the reference card
    shared_per_block: int   # opt-in shared-memory limit of one block, bytes
    shared_per_sm: int      # shared memory of an SM, bytes (1 KiB of it reserved per block)
    regs: int = 65536       # 32-bit registers per SM
    threads: int = 2048     # threads per SM
    blocks: int = 32        # blocks per SM


# One entry per architecture with launch parameters (kernels/mixture.py, ARCHS, has the mixture kernels'
# entry for each): A100 (sm_80) and H100 (sm_90).
GPUS = {
    80: Gpu(sms=108, shared_per_block=166912, shared_per_sm=167936),
    90: Gpu(sms=132, shared_per_block=232448, shared_per_sm=233472),
}
MIN_PROGRAMS = 264  # two programs per SM of an H100: at least as many as any target has SMs x 2
MAX_WAVES = 8  # the split search stops there: more splits only add partial sums to combine


@dataclass(frozen=True)
class Target:
    """Where a launch runs: 'cuda' with a compute capability (80, 90, ...), or 'cpu' (interpreter)."""
    kind: str
    arch: int = 0
    sms: int = 0

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"


CPU = Target("cpu")


def target_for(device: torch.device) -> Target:
    if device.type != "cuda":
        return CPU
    return _cuda_device_target(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_device_target(index: int) -> Target:
    # once per device: every kernel call asks, and the property queries cost host time on a launch-bound call
    props = torch.cuda.get_device_properties(index)
    return Target("cuda", 10 * props.major + props.minor, props.multi_processor_count)


def cuda_target(arch: int) -> Target:
    """A GPU of compute capability ``arch`` (80 or 90), for offline compilation."""
    if arch not in GPUS:
        raise ValueError(f"no tile table for sm_{arch}; known: {', '.join(f'sm_{a}' for a in GPUS)}")
    return Target("cuda", arch, GPUS[arch].sms)


def table_arch(target: Target) -> int:
    """The tabulated architecture a device uses: the newest one not newer than it (sm_90 tiles from 9.0 up,
    sm_80 tiles from 8.0 to 8.9), the oldest for older devices."""
    return max((a for a in GPUS if a <= target.arch), default=min(GPUS))


def min_programs(target: Target) -> int:
    # CPU (interpreter): a few programs per axis, so tests exercise the split combine
    return max(MIN_PROGRAMS, 2 * target.sms) if target.cuda else 4


@dataclass
class Launch:
    kernel: str                 # attribute of the kernel module
    grid: tuple
    args: tuple
    meta: dict = field(default_factory=dict)  # constexprs + num_warps / num_stages

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def resident_programs(arch: int, num_warps: int, regs: int, shared_bytes: int) -> int:
    """Programs of one kernel an SM holds at once, from its registers per thread and shared memory per
    program (what the compile report reads from the cubin)."""
    gpu = GPUS[table_arch(Target("cuda", arch))]
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    by_regs = gpu.regs // (per_warp * num_warps)
    by_shared = gpu.shared_per_sm // (shared_bytes + 1024) if shared_bytes else gpu.blocks
    return max(0, min(by_regs, by_shared, gpu.threads // (32 * num_warps), gpu.blocks))


SPLIT_ENV = "BYPE_KERNEL_SPLIT"  # waves (default) | programs: the rule of split(), for A/B timings on a GPU


def split_rule() -> str:
    rule = os.environ.get(SPLIT_ENV, "waves") or "waves"
    if rule not in ("waves", "programs"):
        raise ValueError(f"{SPLIT_ENV}={rule!r}: expected 'waves' or 'programs'")
    return rule


def split(loop_tiles: int, other_programs: int, target: Target, resident: int = 0) -> tuple[int, int]:
    """(splits, tiles per split) for a loop of ``loop_tiles`` tiles run by ``other_programs``
    programs each, every split non-empty.

    Without ``resident`` (programs per SM at once; the interpreter, the coreset kernels): enough splits to
    reach :func:`min_programs`. With it, among the splits that reach min_programs (or the most programs
    there can be), the one with the smallest makespan ``waves x tiles per split``, where a wave is
    ``SMs x resident`` programs, fewest programs on a tie: 272 programs on 264 slots would be two waves,
    the second almost empty, as slow as 528. ``BYPE_KERNEL_SPLIT=programs`` keeps the first rule (A/B)."""
    if not (target.cuda and resident > 0) or split_rule() == "programs":
        want = max(1, min(loop_tiles, cdiv(min_programs(target), max(other_programs, 1))))
        per = max(1, loop_tiles // want)
        return cdiv(loop_tiles, per), per
    return _makespan_split(loop_tiles, max(other_programs, 1), target.sms * resident, min_programs(target))


@functools.lru_cache(maxsize=4096)
def _makespan_split(loop_tiles: int, other: int, slots: int, floor: int) -> tuple[int, int]:
    floor = min(floor, other * loop_tiles)
    best = None
    for per in range(loop_tiles, 0, -1):  # fewer tiles per split = more splits = more programs
        splits = cdiv(loop_tiles, per)
        programs = other * splits
        if programs < floor:
            continue
        if best is not None and programs > MAX_WAVES * max(slots, floor):
            break
        cost = (cdiv(programs, slots) * per, programs)
        if best is None or cost < best[0]:
            best = (cost, (splits, per))
    return best[1]


def pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x = hi + lo, hi exactly representable in tf32 (10-bit mantissa, round to nearest).

    3xTF32 then computes a.b as lo_a.hi_b + hi_a.lo_b + hi_a.hi_b: the dropped lo.lo term and
    the tf32 rounding of lo are ~2^-22 |a||b| each (checked by emulation in the tests)."""
    bits = x.contiguous().view(torch.int32)
    hi = ((bits + 0x1000) & -0x2000).view(torch.float32)  # -0x2000 == 0xFFFFE000 as int32
    return hi, x - hi
