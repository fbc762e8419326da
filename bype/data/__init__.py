"""Data for training: one bundle whatever the source (in-memory IDX files or streamed shards)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from bype.data.memory import MemoryLoader, Split, load_idx_dataset


@dataclass
class DataBundle:
    input_shape: tuple  # (C, H, W)
    n_train: int
    train_loader: Any  # MemoryLoader or bype.data.stream.ShardStream: __len__ and epoch(e)
    val: Split
    test: Split
    stats: dict  # sufficient statistics of the training grey levels: n, sum_x [D] float64, sum_sq
    _train_split: Optional[Split] = None
    _load_train: Optional[Callable[[], Split]] = field(default=None, repr=False)

    def train_split(self) -> Split:
        """The whole training split in memory (Exemplar bank, kNN reference, coreset initialisation)."""
        if self._train_split is None:
            self._train_split = self._load_train()
        return self._train_split

    def init_rows(self, m: int, generator: torch.Generator) -> torch.Tensor:
        """`m` distinct random training images, flattened grey levels [m, D].

        Rows of a streamed split that could not be read (label -1, kept only with verification off) are
        never picked."""
        train = self.train_split()
        order = torch.randperm(len(train), generator=generator)
        readable = order[train.y[order] != -1]
        pick = (readable if len(readable) >= m else order)[:m]
        return train.x[pick].reshape(m, -1).float() / 255.0


def device_batches(loader, epoch: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of one epoch on `device`, x float32 in [0, 1]: loaders that can (`raw_epoch`) hand over
    uint8 (pinned when CUDA is there), copied without blocking and converted on the device: a quarter of
    the bytes over the bus and no float pass on the host."""
    raw = getattr(loader, "raw_epoch", None)
    for x, y, idx in (raw(epoch) if raw is not None else loader.epoch(epoch)):
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # one pass: uint8 in, float32 out
            x = torch.div(x, 255.0, out=torch.empty(x.shape, dtype=torch.float32, device=x.device))
        yield x, y.to(device, non_blocking=True), idx.to(device, non_blocking=True)


def split_stats(split: Split) -> dict:
    x = split.floats().double()
    return {"n": len(split), "sum_x": x.sum(0), "sum_sq": (x**2).sum()}


def load_data(cfg, rank: int = 0, world_size: int = 1) -> DataBundle:
    d = cfg.data
    if d.source == "memory":
        train, val, test = load_idx_dataset(d.dataset, d.root)
        train, val, test = train.head(d.train_limit), val.head(d.eval_limit), test.head(d.eval_limit)
        loader = MemoryLoader(train, cfg.train.batch_size, cfg.seed, rank, world_size)
        return DataBundle(tuple(train.x.shape[1:]), len(train), loader, val, test, split_stats(train),
                          _train_split=train)
    from bype.data import stream

    manifest = stream.load_manifest(d.shards)
    verify = d.stream.verify and stream.verify_available(d.shards)
    if verify:  # one policy for every prior: refuse a damaged training set before any work
        bad = stream.verify_shards(d.shards, "train")
        if bad:
            raise ValueError(f"{bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; "
                             f"set data.stream.verify=false to train on, skipping what cannot be read")
    loader = stream.ShardStream(
        d.shards, split="train", batch_size=cfg.train.batch_size // world_size, seed=cfg.seed, rank=rank,
        world_size=world_size, num_workers=d.num_workers, mode=d.stream.mode,
        samples_per_epoch=d.stream.samples_per_epoch, shuffle_buffer=d.stream.shuffle_buffer,
        on_error=d.stream.on_error)

    def in_memory(split: str) -> Split:
        x, y = stream.load_split_in_memory(d.shards, split, verify=verify and split != "train",  # hashed above
                                           on_error="raise" if d.stream.verify else "skip")
        return Split(x, y)

    val, test = in_memory("val").head(d.eval_limit), in_memory("test").head(d.eval_limit)
    stats = stream.manifest_stats(manifest, "train")
    return DataBundle(tuple(manifest["shape"]), int(stats["n"]), loader, val, test, stats,
                      _load_train=lambda: in_memory("train"))
