"""Epoch plans: which samples each reader (rank x DataLoader worker) reads, and the padding marks.

`resample` (default): every reader draws shards with replacement from all shards, seeded by
    (seed, epoch, rank, worker) (`resample_segments`), and the main process cuts the epoch at
    `len = ceil(samples_per_epoch / (world_size * batch_size))` batches. Within an epoch a sample may
    be seen twice or not at all; over epochs every sample is seen equally often in expectation.
    Needs no counts when `samples_per_epoch` is given; works with any number of shards, even one.
`exact` (`exact_plan`): each sample exactly once per epoch across all ranks. The shards, shuffled by
    (seed, epoch) identically on every rank, are concatenated and cut into one contiguous range
    per reader (rank-major, then worker), so a shard can be shared by readers, each reading its own
    slice: fewer shards than readers is fine. A reader skips the part of a shard before its slice
    (blocks wholly before it are not decoded), so the extra I/O per epoch is at most one shard per reader.
    `len = ceil(N / (world_size * batch_size))`; a rank's `len * batch_size` slots exceed its share
    of N by less than `batch_size + 1` samples, filled with padding: copies of samples the reader
    already yielded, placed in its last batch. With `pad="flag"` (default) a padding sample's idx
    is `-2 - idx` (see `is_padding`, `true_index`): mask it out of the loss to count every sample
    exactly once. With `pad="wrap"` its idx is unchanged (like DistributedSampler: a few samples
    count twice per epoch). A reader whose samples were all unreadable pads with zero images,
    y = idx = -1.

Plans depend only on their arguments: every rank computes the same one without communicating.
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import torch
from torch import Tensor


def _rng_seed(*keys: int) -> int:
    """A 64-bit seed mixed from non-negative ints; stable across processes (unlike hash of a str)."""
    return int(np.random.SeedSequence([k % (1 << 63) for k in keys]).generate_state(1, np.uint64)[0])


def exact_plan(counts: list[int], *, seed: int, epoch: int, world_size: int, num_workers: int,
               batch_size: int) -> tuple[int, dict[tuple[int, int], tuple[list[tuple[int, int, int]], int]]]:
    """Steps per rank and, per reader (rank, worker), its segments [(shard, start, stop)] and slot count.

    The plan depends only on its arguments, so every rank computes the same one without communicating.
    """
    n, R, W, B = sum(counts), world_size, max(1, num_workers), batch_size
    steps = max(1, math.ceil(n / (R * B)))
    order = list(range(len(counts)))
    random.Random(_rng_seed(seed, epoch)).shuffle(order)
    # Real samples per reader: ranks differ by at most one; within a rank, in proportion to slots.
    batches = [steps // W + (w < steps % W) for w in range(W)]
    sizes = []
    for r in range(R):
        n_r = n // R + (r < n % R)
        share = [n_r * k // steps for k in batches]
        for w in range(W):  # hand out the rounding remainder where there is room
            extra = min(n_r - sum(share), batches[w] * B - share[w])
            share[w] += max(0, extra)
        sizes.extend(share)
    plan, shard_pos, offset = {}, 0, 0
    for i, size in enumerate(sizes):
        segments, need = [], size
        while need > 0:
            s = order[shard_pos]
            take = min(need, counts[s] - offset)
            if take > 0:
                segments.append((s, offset, offset + take))
            need, offset = need - take, offset + take
            if offset >= counts[s]:
                shard_pos, offset = shard_pos + 1, 0
        plan[(i // W, i % W)] = (segments, batches[i % W] * B)
    return steps, plan


def resample_segments(urls: list[str], counts: list[int | None], *, seed: int, epoch: int, rank: int,
                      worker: int) -> Iterator[tuple[str, int, None, int | None]]:
    """Resample mode's endless shard draws for reader (rank, worker): segments (url, 0, None, expected
    count), drawn with replacement from all shards, seeded by (seed, epoch, rank, worker)."""
    draw = random.Random(_rng_seed(seed, epoch, rank, worker, 2))
    expected = dict(zip(urls, counts))
    return ((u, 0, None, expected[u]) for u in iter(lambda: draw.choice(urls), None))


def is_padding(idx: Tensor) -> Tensor:
    """True where `idx` marks a padding sample of exact mode with pad="flag"."""
    return idx <= -2


def true_index(idx: Tensor) -> Tensor:
    """The sample index behind a flagged padding idx (unchanged for ordinary samples)."""
    return torch.where(idx <= -2, -2 - idx, idx)
