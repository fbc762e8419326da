"""Evaluation chunks chosen from a memory budget in bytes (`eval.memory_mb`).

Every evaluation (IS NLL and ELBO, validation, kNN encodings, the Exemplar prior's bank) runs the model
on chunks of rows. How many rows fit depends on the architecture, the prior and the data dimension
(a 218x178x3 row costs ~150x a 28x28 one), so a row count alone cannot bound memory. `rows_within`
measures instead: it runs the chunk function on two small probe sizes, records the peak bytes of the
tensors they allocate (on CUDA the allocator's peak; on CPU `TensorPeak`, a dispatch mode that follows
every tensor storage an op creates until it is freed), fits peak = fixed + rows * per_row, and returns
the largest row count whose predicted peak stays inside the budget.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

log = logging.getLogger("bype")

DEFAULT_MEMORY_MB = 2048  # fits a laptop beside the model; raise it on a large GPU for bigger chunks
SAFETY = 0.8  # fraction of the budget given to the probe's linear fit (allocator slack, kernels' own tiles)


class EvalMemoryError(ValueError):
    """The budget cannot hold even the smallest chunk."""


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive (CPU or any device).

    Storages that existed before the mode (parameters, inputs) are not counted: the result is what the
    code allocates itself. Allocations hidden inside an opaque custom op (a kernel's private tiles) are
    not seen; SAFETY leaves room for them.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes the CUDA caching allocator handed out while `fn()` ran, above what was allocated before."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while `fn()` runs (its result dropped)."""
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    meter = TensorPeak()
    with meter:
        fn()
    return meter.peak


def rows_within(run: Callable[[int], object], device: torch.device, what: str, cap: Optional[int] = None,
                memory_mb: float = DEFAULT_MEMORY_MB, probe: tuple[int, int] = (4, 12)) -> int:
    """The largest row count n for which `run(n)` fits `memory_mb` (at most `cap`, at least 1).

    `run(n)` evaluates one chunk of n rows; it is called once to warm up, then on the two probe sizes,
    inside a forked RNG.
    """
    budget = memory_mb * 2**20
    small, large = probe
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        run(1)  # fills caches that the first call builds (the Exemplar prior's encoded bank)
        p_small, p_large = peak_bytes(lambda: run(small), device), peak_bytes(lambda: run(large), device)
    per_row = max(1.0, (p_large - p_small) / (large - small))
    fixed = max(0.0, p_small - small * per_row)
    rows = int((SAFETY * budget - fixed) // per_row)
    if rows < 1:
        raise EvalMemoryError(f"eval.memory_mb: {budget / 2**20:.0f} MB cannot hold one row of {what} "
                              f"({fixed / 2**20:.0f} MB fixed + {per_row / 2**20:.1f} MB per row); raise it")
    rows = rows if cap is None else min(rows, cap)
    log.debug("%s: %.2f MB per row + %.1f MB fixed -> %d rows per chunk within %.0f MB", what,
              per_row / 2**20, fixed / 2**20, rows, budget / 2**20)
    return rows


def encode_rows(model, data_dim: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Rows per chunk for the encoder alone (kNN means, the Exemplar prior's bank, prior components)."""
    device = next(model.parameters()).device
    return rows_within(lambda n: model.encode_flat(torch.zeros(n, data_dim, device=device)), device,
                       "the encoder", memory_mb=memory_mb)


@contextlib.contextmanager
def chunked_encoder(model, rows: int):
    """Within the block, model.encode_flat runs `rows` rows at a time (no autograd: evaluation only), and
    encodes a tensor the model holds (ByPE's pseudodata U) once.

    The mixture priors encode all their components in every log_prob call; at 218x178x3 that alone can
    take gigabytes and most of the time. The encoder is row-wise, so the concatenated chunks equal the one
    call; the model is frozen during evaluation, so a held tensor's encoding stays valid while its version
    (in-place writes) is unchanged.
    """
    whole, own = model.encode_flat, "encode_flat" in vars(model)
    held = {id(t): t for t in [*model.buffers(), *model.parameters()]}
    memo: dict[int, tuple[int, tuple]] = {}

    def encode_flat(x):
        key = id(x) if held.get(id(x)) is x else None
        if key is not None and key in memo and memo[key][0] == x._version:
            return memo[key][1]
        out = whole(x) if x.shape[0] <= rows else tuple(torch.cat(p) for p in zip(*[whole(c) for c in x.split(rows)]))
        if key is not None:
            memo[key] = (x._version, out)
        return out

    model.encode_flat = encode_flat
    try:
        yield
    finally:
        if own:
            model.encode_flat = whole
        else:
            del model.encode_flat  # the class's method again
