"""Small shared pieces of the test suite."""
from __future__ import annotations

import functools

from bype.config import load_config

import kernels

# A small but real configuration: real Fashion-MNIST, a subset, a narrow network, short epochs.
TINY = [
    "data.train_limit=1000", "data.eval_limit=200", "model.hidden=64", "model.latent_dim=8",
    "prior.components=20", "train.batch_size=50", "train.warmup_epochs=2", "train.log_every=1000",
    "coreset.every=2", "coreset.steps=5", "coreset.samples=20", "eval.at_end=false", "eval.knn_k=[3]",
]


def tiny_config(tmp_path, *overrides):
    return load_config(None, [f"out_dir={tmp_path}", *TINY, *overrides])


def triton_skip_reason(load_triton_module) -> str:
    """'' when an op's Triton path can run here (CPU tensors through the interpreter), else why not."""
    import torch

    if not kernels.triton_available():
        return "triton not installed"
    if not kernels.interpreter_enabled():
        return "TRITON_INTERPRET is not 1"
    try:
        load_triton_module(torch.device("cpu"))
    except RuntimeError as e:  # triton imported earlier in this session without the interpreter
        return str(e)
    return _interpreter_limits()


@functools.lru_cache(maxsize=1)
def _interpreter_limits() -> str:
    """'' when this Triton's interpreter runs a loop whose bound is a kernel argument, as every kernel here
    does; Triton 3.6's passes scalar arguments as 1-element arrays, which `range` refuses (its compiled
    kernels are fine: the CUDA cases run them)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_to(out_ptr, n):
        acc = tl.zeros((1,), tl.float32)
        for _ in range(0, n):
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, 1), acc)

    out = torch.zeros(1)
    try:
        _loop_to[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - any failure means the interpreter cannot run the kernels
        return f"the interpreter of triton {triton.__version__} cannot run a loop to a runtime bound ({type(e).__name__})"
    return "" if out.item() == 3.0 else f"the interpreter of triton {triton.__version__} miscounts a runtime loop"
