"""Checks made before any work: the configuration against the data the run will read, and the run directory.

Sizes are compared with the examples the run actually reads: the shard manifest's counts (data.source=shards)
or the IDX files' (memory), cut by data.train_limit / data.eval_limit; never a data set's nominal size.
`bype train --check` runs these checks alone (the launchers call it before any worker starts); the trainer
runs them first too, so a bad start stops with one line before it loads data or writes a file.
"""
from __future__ import annotations

import gzip
import os
import struct
from typing import Optional

from bype.config import Config, ConfigError

GENERIC_SOURCES = ("imagefolder", "npz")  # `bype data prepare` sources without a data set's name


def check_run_dir(run_dir: str, resume: bool) -> None:
    has_run = os.path.exists(os.path.join(run_dir, "last.pt"))
    if has_run and not resume:
        raise FileExistsError(f"{run_dir}: already holds a run; continue it with "
                              f"`bype train --resume {run_dir}` or start another with name=NEW")
    if resume and not has_run:
        raise FileNotFoundError(f"{run_dir}: nothing to resume (no last.pt)")


def _idx_length(root: str, name: str) -> int:
    """The example count in an IDX file's header (its first dimension), without reading the data."""
    from bype.data.idx import find_idx

    path = find_idx(root, name)
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        header = f.read(8)
    if len(header) < 8 or header[:2] != b"\0\0":
        raise ValueError(f"{path}: not an IDX file")
    return struct.unpack(">I", header[4:8])[0]


def data_counts(cfg: Config) -> tuple[dict[str, int], str]:
    """Examples per split (train, val, test) the run will read, and where the counts came from."""
    d = cfg.data
    if d.source == "shards":
        from bype.data.manifest import SPLITS, load_manifest, manifest_location

        manifest, where = load_manifest(d.shards), manifest_location(d.shards)
        # shards of a named data set must be that one; shards of the user's own images (`bype data prepare
        # imagefolder / npz`) carry no name to compare and train under any data.dataset of their kind
        if manifest["dataset"] not in GENERIC_SOURCES and manifest["dataset"] != d.dataset:
            raise ConfigError(f"data.shards: {where} holds {manifest['dataset']} shards, but data.dataset is "
                              f"{d.dataset}")
        missing = [s for s in SPLITS if s not in manifest["splits"]]
        if missing:
            raise ConfigError(f"data.shards: {where} has no {missing[0]!r} split (has: "
                              f"{', '.join(sorted(manifest['splits'])) or 'none'})")
        counts = {s: int(manifest["splits"][s]["count"]) for s in SPLITS}
    else:
        from bype.data.idx import IDX_FILES
        from bype.data.memory import DEFAULT_ROOTS, N_VAL

        where = d.root or DEFAULT_ROOTS[d.dataset]
        if not os.path.isdir(where):
            raise FileNotFoundError(f"data.root: {where} does not exist")
        n = _idx_length(where, IDX_FILES["train"][0])
        counts = {"train": max(n - N_VAL, 0), "val": min(n, N_VAL), "test": _idx_length(where, IDX_FILES["test"][0])}
    if d.train_limit is not None and d.train_limit < counts["train"]:
        counts["train"], where = d.train_limit, f"{where}, data.train_limit"
    for split in ("val", "test"):
        counts[split] = min(counts[split], d.eval_limit or counts[split])
    return counts, where


def check_sizes(cfg: Config, counts: dict[str, int], where: str) -> None:
    """Every size the configuration asks of the data, against `counts` (see data_counts)."""
    n = counts["train"]
    if n == 0:
        raise ConfigError(f"data: no training examples ({where})")
    if cfg.prior.kind in ("bype", "vampprior") and cfg.prior.components > n:
        raise ConfigError(f"prior.components: M={cfg.prior.components} exceeds the training-set size N={n} "
                          f"({where})")
    if cfg.train.batch_size > n:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} exceeds the training-set size N={n} ({where})")
    if counts["val"] == 0:
        raise ConfigError(f"data: the validation split is empty ({where}); it gives the loss for early stopping")
    if cfg.eval.at_end and counts["test"] == 0:
        raise ConfigError(f"data: the test split is empty ({where}); set eval.at_end=false to train without it")
    if cfg.eval.at_end and cfg.eval.knn_k and max(cfg.eval.knn_k) > n:
        raise ConfigError(f"eval.knn_k: k={max(cfg.eval.knn_k)} exceeds the N={n} training examples the kNN "
                          f"classifier searches ({where})")


def check_world(cfg: Config, world_size: int) -> None:
    """What the number of processes asks of the config: each rank takes batch_size / world rows per step."""
    if world_size < 1:
        raise ConfigError(f"world size: must be >= 1, got {world_size}")
    if world_size > 1 and cfg.dist.engine == "none":
        raise ConfigError(f"dist.engine: none cannot run {world_size} processes; use ddp or deepspeed")
    if cfg.train.batch_size % world_size:
        fit = world_size * max(1, round(cfg.train.batch_size / world_size))
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} (the global batch) is not divisible by the "
                          f"world size {world_size}; use a multiple of {world_size}, e.g. {fit}")


def check_start(cfg: Config, resume: bool, world_size: Optional[int] = 1) -> dict[str, int]:
    """The checks of a start (fresh or resumed) that need no model: run directory, world size (None: not
    known yet, as when a launcher cannot tell; the workers check it), data sizes."""
    check_run_dir(cfg.run_dir, resume)
    if world_size is not None:
        check_world(cfg, world_size)
    counts, where = data_counts(cfg)
    check_sizes(cfg, counts, where)
    return counts
