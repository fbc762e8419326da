"""In-memory data: MNIST / Fashion-MNIST from IDX files, the 50k / 10k / 10k split, batch iteration."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from bype.data.idx import load_idx_split

DEFAULT_ROOTS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
N_VAL = 10000  # the last 10k of the official training set, the split of the reference code


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # long [N]

    def __len__(self) -> int:
        return self.x.shape[0]

    def floats(self) -> torch.Tensor:
        """Grey levels in [0, 1], flattened [N, D]."""
        return self.x.reshape(len(self), -1).float() / 255.0

    def head(self, n: Optional[int]) -> "Split":
        return self if n is None else Split(self.x[:n], self.y[:n])


def load_idx_dataset(dataset: str, root: Optional[str]) -> tuple[Split, Split, Split]:
    """(train, val, test) of MNIST-like IDX data; val is the last 10k of the official train set."""
    root = root or DEFAULT_ROOTS[dataset]
    if not os.path.isdir(root):
        hint = " (install it: apt-get install dataset-fashion-mnist)" if dataset == "fashion-mnist" else ""
        raise FileNotFoundError(f"data.root: {root} does not exist{hint}")
    x, y = load_idx_split(root, "train")
    xt, yt = load_idx_split(root, "test")
    x, xt = torch.from_numpy(x.copy())[:, None], torch.from_numpy(xt.copy())[:, None]
    y, yt = torch.from_numpy(y), torch.from_numpy(yt)
    n_train = x.shape[0] - N_VAL
    return Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), Split(xt, yt)


class MemoryLoader:
    """Shuffled minibatches of an in-memory split, sharded across ranks.

    `batch_size` is the global batch: every epoch draws one permutation from (seed, epoch), cuts it into
    global batches (the tail is dropped), and rank r takes rows r, r + world, ... of each. The union over
    ranks is exactly the single-process batch, so DDP's averaged gradient equals the 1-process one.
    """

    def __init__(self, split: Split, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"train.batch_size: {batch_size} is not divisible by the world size {world_size}")
        if batch_size > len(split):
            raise ValueError(f"train.batch_size: {batch_size} exceeds the {len(split)} training examples")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.split) // self.batch_size

    def raw_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` as stored: x uint8 [B, C, H, W], y, idx (the rows)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.split), generator=g)
        for step in range(len(self)):
            rows = order[step * self.batch_size:(step + 1) * self.batch_size][self.rank::self.world_size]
            yield self.split.x[rows], self.split.y[rows], rows

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for x, y, rows in self.raw_epoch(epoch):
            yield x.float() / 255.0, y, rows
