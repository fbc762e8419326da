"""Checkpoints written atomically and read back with clear errors; a checkpoint is data, never code.

`save` serialises the state in memory, then writes it to a temporary file in the same directory, fsyncs,
keeps the previous file as `<name>.prev.pt`, and renames: a crash at any moment leaves a complete
checkpoint on disk, and a disk that refuses the bytes (full, read-only) ends in one line (atomic.DiskError)
with the previous checkpoint whole.

`load` unpickles with torch.load(weights_only=True): tensors, numbers, strings, None and containers of
them. A pickle can name any function to call while it is read (os.system, say); such a file is refused in
one line naming the global. `save` therefore stores only such plain data (numpy's RNG state as a dict of
lists, numpy scalars as Python numbers); the numpy array of the RNG state that earlier releases stored is
the one other type allowed, by name, so their checkpoints still load.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from bype.atomic import disk_error, write_bytes_atomic

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


# --- plain data ----------------------------------------------------------------------------------------
# What weights_only unpickling rebuilds without calling anything a file names. Exact types: a subclass
# (an IntEnum, a namedtuple, a defaultdict) is pickled by its class's name, which the load refuses.
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.nn.Parameter, torch.Size,
           torch.device, torch.dtype)
_DICTS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, set)


def plain(obj: Any, where: str = "state") -> Any:
    """`obj` as plain data: numpy scalars become Python numbers; any other type is refused here, at the save,
    rather than at the resume that could not load it. Unchanged parts are returned as they are (a module's
    state_dict keeps its OrderedDict and the _metadata that load_state_dict reads)."""
    if type(obj) in _LEAVES:
        return obj
    if isinstance(obj, np.generic):  # np.float64 from a numpy reduction: pickled by numpy's name
        return obj.item()
    if type(obj) in _DICTS:
        out = {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
        if all(out[k] is v for k, v in obj.items()):
            return obj
        copy = obj.copy()  # the same dict type, then the converted values and the attributes (_metadata)
        copy.update(out)
        if hasattr(obj, "__dict__"):
            copy.__dict__.update(obj.__dict__)
        return copy
    if type(obj) in _SEQUENCES:
        out = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return obj if all(a is b for a, b in zip(out, obj)) else type(obj)(out)
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot go into a checkpoint "
                    "(weights_only loading refuses it); store it as tensors, numbers, strings or containers")


def save(state: dict, path: str) -> None:
    state = plain(dict(state, format_version=FORMAT_VERSION))
    buf = io.BytesIO()
    # In memory first: the size is known for the message of a full disk, and torch's zip writer never sees
    # a failing file (it then adds a second error, "unexpected pos", to the OSError).
    torch.save(state, buf)
    data = buf.getbuffer()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise disk_error(path, e, len(data), "there was no previous checkpoint") from e
    write_bytes_atomic(path, data, suffix=".pt", keep_previous=previous_path(path), what="checkpoint")


def previous_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return root + ".prev" + ext


# --- loading -------------------------------------------------------------------------------------------

def _legacy_globals() -> list:
    """The globals of the numpy RNG state earlier releases stored (np.random.get_state(): a tuple holding a
    uint32 array): the array's rebuild function, its class and its dtype, each of which only makes an
    array. Named as numpy 1.x (numpy.core) and 2.x (numpy._core) write them."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _unsafe_global(error: Exception) -> str | None:
    """The global a weights_only load refused ('posix.system'), from torch's message; None if none is named."""
    match = re.search(r"GLOBAL (\S+)", str(error))
    return match.group(1) if match else None


def _torch_load(path: str, map_location: Any) -> Any:
    with torch.serialization.safe_globals(_legacy_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def load(path: str, map_location: Any = "cpu") -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = _torch_load(path, map_location)
    except pickle.UnpicklingError as e:
        name = _unsafe_global(e)
        if name is None:
            raise CheckpointError(_corrupt(path, e)) from None
        raise CheckpointError(f"{path}: refused to load {name}: a checkpoint holds only tensors, numbers, strings "
                              "and containers (data, never code); bype never writes this, so the file was altered "
                              "or is not a bype checkpoint: do not use it") from None
    except Exception as e:  # torch raises several types for truncated / corrupt zip archives
        raise CheckpointError(_corrupt(path, e)) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a bype checkpoint (missing or unknown format_version)")
    return state


def _corrupt(path: str, error: Exception) -> str:
    prev = previous_path(path)
    hint = f"; the previous checkpoint {prev} is intact" if _readable(prev) else ""
    return f"{path}: corrupt or truncated checkpoint ({type(error).__name__}){hint}"


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
        _torch_load(path, "cpu")
        return True
    except Exception:
        return False


# --- RNG state -----------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every global RNG's state as plain data: torch's are tensors, Python's a tuple of ints, numpy's its
    dict form with the key array as a list."""
    npy = np.random.get_state(legacy=False)
    npy["state"] = dict(npy["state"], key=npy["state"]["key"].tolist())
    state = {"torch": torch.get_rng_state(), "numpy": npy, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # the dict above, or the tuple of checkpoints of earlier releases
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
