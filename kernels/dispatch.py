"""Implementation choice shared by every op in :mod:`kernels`.

``impl="auto"`` picks Triton for CUDA tensors (when triton imports) and torch otherwise; the
environment variable ``BYPE_KERNEL_IMPL`` (``torch`` / ``triton``) overrides ``auto`` only, so
an explicit ``impl=`` argument always wins. Triton on CPU tensors runs through the Triton
interpreter and therefore needs ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

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


# --- fallback of an automatic choice ------------------------------------------------------------------
# Triton kernels compile on first use, on the machine that runs them: a Triton release other than the
# tested ones (3.6, 3.9) can refuse one (a changed language feature, a resource limit). Where "auto"
# picked Triton, such an error switches that op to its torch path for the rest of the process, with one
# warning that names the error; an explicit impl="triton" or BYPE_KERNEL_IMPL=triton raises it instead.
_TRITON_FAILED: dict[str, str] = {}  # op name -> the error that turned its Triton path off


def chosen_by_auto(requested: str) -> bool:
    """Whether ``requested`` leaves the choice to ``auto`` (no explicit impl, no BYPE_KERNEL_IMPL)."""
    return requested == "auto" and os.environ.get(ENV_VAR, "").strip().lower() in ("", "auto")


def triton_failed(op: str) -> bool:
    """Whether an automatic Triton choice of ``op`` has already failed in this process."""
    return op in _TRITON_FAILED


def triton_errors() -> tuple[type, ...]:
    """The exceptions of Triton's compiler and launcher (imported only once Triton runs anyway)."""
    try:
        from triton.errors import TritonError
        return (TritonError,)
    except ImportError:  # releases before triton.errors
        from triton.compiler.errors import CompilationError
        return (CompilationError,)


def fall_back(op: str, error: Exception) -> None:
    """Turn ``op``'s automatic Triton choice off for this process and say so once."""
    if op not in _TRITON_FAILED:
        first = (str(error).strip().splitlines() or [""])[-1][:200]
        _TRITON_FAILED[op] = f"{type(error).__name__}: {first}"
        warnings.warn(f"{op}: the Triton kernels failed on this machine ({_TRITON_FAILED[op]}); impl='auto' "
                      f"uses the torch path from now on in this process. {ENV_VAR}=triton raises the error "
                      "instead.", RuntimeWarning, stacklevel=3)


def with_fallback(op: str, auto: bool, triton_call, torch_call):
    """``triton_call()``; where ``auto`` chose Triton and Triton fails (now or before), ``torch_call()``."""
    if auto and triton_failed(op):
        return torch_call()
    try:
        return triton_call()
    except Exception as error:
        if not auto or not isinstance(error, triton_errors()):
            raise
        fall_back(op, error)
        return torch_call()
