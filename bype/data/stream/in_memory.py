"""Whole prepared splits in memory (validation / test sets, exemplar banks), read on a few threads."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ..manifest import load_manifest, manifest_layout, manifest_location, sha256_file, split_entry
from .reader import _ShardError, shard_chunks
from .spec import _manifest_base

log = logging.getLogger("bype.data")


def load_split_in_memory(directory: str, split: str, *, verify: bool = True, on_error: str = "raise",
                         num_threads: int = 4) -> tuple[Tensor, Tensor]:
    """All of a prepared split: images uint8 [N, C, H, W] and labels long [N], in index order.

    For validation / test sets and exemplar banks. With `verify`, each shard's sha256 is checked against
    the manifest first. `on_error="raise"`: ValueError naming the shard on any corrupt, missing or duplicate
    sample. `on_error="skip"`: unreadable samples stay zero images with label -1 (rows keep their index)
    and are counted in one warning on logger "bype.data".
    """
    m = load_manifest(directory)
    location = manifest_location(os.fspath(directory))
    entry = split_entry(m, split, location)
    base, shape, n = _manifest_base(location), tuple(m["shape"]), entry["count"]
    block_size = m.get("block_size") if manifest_layout(m) == "blocks" else None
    images = np.zeros((n, *shape), dtype=np.uint8)
    labels = np.full(n, -1, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    bad: list[str] = []

    def fail(kind: str, message: str) -> None:
        raise ValueError(message)

    def load(shard: dict) -> None:
        path = f"{base}/{shard['name']}"
        try:
            if verify and sha256_file(path) != shard["sha256"]:
                raise ValueError(f"{path}: sha256 differs from the manifest (corrupt or modified shard)")
            for x, y, i in shard_chunks(path, expected=shard["count"], shape=shape, block_size=block_size,
                                        report=fail if on_error == "raise" else lambda k, msg: bad.append(msg)):
                if i.min() < 0 or i.max() >= n or seen[i].any() or len(np.unique(i)) != len(i):
                    raise ValueError(f"{path}: idx {int(i[0])}..{int(i[-1])} out of range or duplicate")
                images[i], labels[i], seen[i] = x, y, True
        except (_ShardError, ValueError, OSError) as e:
            if on_error == "raise":
                raise ValueError(str(e) if str(e).startswith(path) else f"{path}: {e}") from e
            bad.append(str(e))

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        list(pool.map(load, entry["shards"]))
    if not seen.all():
        if on_error == "raise":
            raise ValueError(f"{location}: split {split!r} lacks samples, e.g. idx {int(np.flatnonzero(~seen)[0])}")
        log.warning("split %r of %s: %d of %d samples unreadable, kept as zero images with label -1 (%s)",
                    split, location, int((~seen).sum()), n, "; ".join(bad[:3]) or "missing samples")
    return torch.from_numpy(images), torch.from_numpy(labels)
