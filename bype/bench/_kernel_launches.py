"""What one mixture-prior forward + backward costs the host: kernels launched and host time per call.

At the training shape (B = 100 rows, M = 500 components) the device work of either implementation is a few
microseconds, so a call costs what the host spends issuing it: one CUDA launch (~4-8 us of CPU each) per
aten operator that is not a view or an allocation, plus the Triton launches. This counts both on CPU
tensors, where every aten operator runs the same host-side dispatch it would for a CUDA tensor:

- ``torch``: the chunked torch path, run for real;
- ``triton``: the Triton path with its kernel launches recorded and their device work skipped (the kernels
  are compiled code on a GPU, interpreted Python here; the interpreter's time means nothing for a GPU).

``host_us`` is the host time of one call measured that way (CPU tensors of the training shape); it is
the floor of a GPU call that is launch bound. ``bype bench kernels --launches`` prints the table.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import mixture

# Allocations launch no kernel (their memory comes from the caching allocator); views none either.
_NO_LAUNCH = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "lift_fresh",
              "_to_copy_noop", "detach", "alias", "lift"}


class LaunchCounter(TorchDispatchMode):
    """Aten operators dispatched in a region that launch a device kernel (not views, not allocations)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_LAUNCH:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.ops.values())


@contextmanager
def triton_launches_recorded(arch: int = 90):
    """Replace the mixture launchers' single launch point: record each kernel call, skip its device work
    (the partial outputs keep whatever their allocation held; only the host's work is being measured).
    Launches are planned for an ``sm_<arch>`` GPU (its tiles, padding and splits), not the interpreter."""
    from kernels import tiling

    launched: list[str] = []
    # TRITON_INTERPRET=1: what impl='triton' asks of CPU tensors; nothing is interpreted
    with mock.patch.object(mixture, "_run", lambda launch, device: launched.append(launch.kernel)), \
            mock.patch.object(tiling, "target_for", lambda device: tiling.cuda_target(arch)), \
            mock.patch.dict(os.environ, TRITON_INTERPRET="1"):
        yield launched


def _inputs(B: int, M: int, d: int, mode: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, d, generator=g).requires_grad_()
    means = torch.randn(M, d, generator=g).requires_grad_()
    log_w = torch.randn(M, generator=g).requires_grad_()
    shape = {"shared": (), "component": (M,), "diag": (M, d)}[mode]
    log_var = (0.1 * torch.randn(shape, generator=g)).requires_grad_()
    return z, means, log_w, log_var


def _call(impl: str, inputs) -> None:
    out = kernels.mixture_logpdf(*inputs, impl=impl)
    torch.autograd.grad(out.sum(), inputs)


def _passes(impl: str, inputs, grad: torch.Tensor) -> None:
    """The custom ops' forward and backward bodies, called directly: a dispatch mode sees a custom op as
    one operator and not what its body launches."""
    from kernels import mixture_reference as ref

    z, means, log_w, log_var = (t.detach() for t in inputs)
    if impl == "triton":
        _, lse = mixture.triton_forward(z, means, log_w, log_var)
        mixture.triton_backward(grad, z, means, log_w, log_var, lse)
    else:
        lse = ref.chunked_forward(z, means, log_w, log_var, 0)
        ref.chunked_backward(grad, z, means, log_w, log_var, lse, 0)


def host_cost(impl: str, B: int = 100, M: int = 500, d: int = 40, mode: str = "shared",
              repeats: int = 200) -> dict:
    """Launches of one forward + backward (aten operators that launch, Triton kernels) and its host time."""
    if impl not in ("torch", "triton"):
        raise ValueError(f"host_cost: impl must be 'torch' or 'triton', got {impl!r}")
    inputs = _inputs(B, M, d, mode)
    # The Triton path on CPU tensors would go to the interpreter; its launches are recorded instead.
    with triton_launches_recorded() as launched:
        _call(impl, inputs)  # warm-up: first-call imports and caches
        launched.clear()
        grad = torch.ones(B)  # the upstream gradient, made before counting
        with LaunchCounter() as counter:
            _passes(impl, inputs, grad)
        n_triton = len(launched)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _call(impl, inputs)
            times.append(time.perf_counter() - t0)
    return {"impl": impl, "B": B, "M": M, "d": d, "log_var": mode, "aten_launches": counter.count,
            "triton_launches": n_triton, "launches": counter.count + n_triton,
            "host_us": 1e6 * statistics.median(times), "ops": dict(sorted(counter.ops.items()))}


HEADER = "| impl | B | M | d | log_var | aten launches | Triton launches | launches | host us / call |"


def fmt_row(r: dict) -> str:
    return (f"| {r['impl']} | {r['B']} | {r['M']} | {r['d']} | {r['log_var']} | {r['aten_launches']} | "
            f"{r['triton_launches']} | {r['launches']} | {r['host_us']:.0f} |")


def report(B: int = 100, M: int = 500, d: int = 40, modes=("shared", "diag")) -> list[dict]:
    rows = [host_cost(impl, B, M, d, mode) for mode in modes for impl in ("torch", "triton")]
    print(HEADER)
    print("|" + "---|" * 9)
    for r in rows:
        print(fmt_row(r))
    return rows
