"""Checkpoints written atomically and read back with clear errors.

`save` writes to a temporary file in the same directory, fsyncs, keeps the previous file as
`<name>.prev.pt`, then renames: a crash at any moment leaves a complete checkpoint on disk.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from bype.atomic import write_atomic

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def check_zero_world(engine_state: dict, world_size: int, where: str) -> None:
    """A ZeRO-1/2 engine state (DeepSpeedEngine.state_dict) holds the optimiser partitioned over the ranks that
    wrote it: it resumes only on as many (`bype train --check` and the engine itself ask)."""
    saved, stage = engine_state.get("world_size"), engine_state.get("zero_stage")
    if stage in (1, 2) and saved is not None and saved != world_size:
        raise CheckpointError(f"{where}: the ZeRO-{stage} optimiser state was partitioned over {saved} ranks; "
                              f"resume with {saved} processes, not {world_size}")


def save(state: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    state = dict(state, format_version=FORMAT_VERSION)
    write_atomic(path, lambda f: torch.save(state, f), binary=True, suffix=".pt", keep_previous=previous_path(path))


def previous_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return root + ".prev" + ext


def load(path: str, map_location: Any = "cpu") -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated / corrupt zip archives
        prev = previous_path(path)
        hint = f"; the previous checkpoint {prev} is intact" if _readable(prev) else ""
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}){hint}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a bype checkpoint (missing or unknown format_version)")
    return state


def load_module_state(module: torch.nn.Module, state_dict: dict, path: str) -> None:
    """`module.load_state_dict`, with a mismatch (an override that changed the model) as one line."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise CheckpointError(f"{path}: does not fit the configured model ({detail.rstrip('.')}); "
                              "keep the model settings the run was trained with") from None


def _readable(path: str) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:
        return False


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
