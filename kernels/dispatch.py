"""Implementation choice shared by every op in :mod:`kernels`.

``impl="auto"`` picks Triton for CUDA tensors (when triton imports) and torch otherwise; the
environment variable ``BYPE_KERNEL_IMPL`` (``torch`` / ``triton``) overrides ``auto`` only, so
an explicit ``impl=`` argument always wins. Triton on CPU tensors runs through the Triton
interpreter and therefore needs ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

ENV_VAR = "BYPE_KERNEL_IMPL"
IMPLS = ("auto", "torch", "triton")


_TRITON_AVAILABLE = None


def triton_available() -> bool:
    """Whether triton is installed (looked up without importing it: importing fixes Triton's
    compile-vs-interpret mode, see kernels/mixture_triton.py)."""
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        _TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_impl(tensor: torch.Tensor, impl: str = "auto") -> str:
    """Return the concrete implementation ('torch' or 'triton') for ops on ``tensor``.

    Raises ValueError for an unknown name, RuntimeError when 'triton' cannot run here.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env in ("", "auto"):
            return "triton" if (tensor.is_cuda and triton_available()) else "torch"
        if env not in ("torch", "triton"):
            raise ValueError(f"{ENV_VAR} must be 'torch' or 'triton', got {env!r}")
        impl = env
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' requested but triton is not importable")
        if tensor.device.type == "cpu" and not interpreter_enabled():
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton interpreter) "
                               "or CUDA tensors; use impl='torch' on CPU")
        if tensor.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"impl='triton' supports CUDA (or CPU via the interpreter), got device {tensor.device}")
    return impl
