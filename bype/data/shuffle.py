"""Seeded shuffles and batching on whole arrays: no Python work per sample.

Two stages, both fed with chunks `(x [n, ...], y [n], idx [n])` (a block of a shard, or a few decoded
images) and driven by one `numpy.random.Generator`:

- `shuffle_chunks`: a window of whole chunks, emitted in random order (block order within and across
  shards);
- `BatchShuffler`: a buffer of single samples drawn from many chunks, out of which each batch is
  `batch_size` positions chosen at random. A sample is copied in, copied out, and at most once moved
  inside the buffer (to fill the hole its neighbour left).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def shuffle_chunks(chunks: Iterable[tuple], window: int, rng: np.random.Generator) -> Iterator[tuple]:
    """The chunks in a random order, holding at most `window` of them (window <= 1: unchanged)."""
    if window <= 1:
        yield from chunks
        return
    held: list[tuple] = []
    for chunk in chunks:
        held.append(chunk)
        if len(held) >= window:
            j = int(rng.integers(len(held)))
            held[j], held[-1] = held[-1], held[j]
            yield held.pop()
    order = rng.permutation(len(held))
    for j in order:
        yield held[j]


class BatchShuffler:
    """Batches of exactly `batch_size` samples drawn at random from a buffer of `buffer` samples.

    `push(chunk)` returns the batches that became ready; `drain()` returns the remaining full batches
    and the leftover (fewer than `batch_size` samples, in random order). With `buffer <= 1` the samples
    keep their arrival order. The buffer ramps up from a fifth of its size (see `_fill`).
    """

    def __init__(self, batch_size: int, buffer: int, rng: np.random.Generator):
        self.batch_size, self.buffer, self.rng = batch_size, max(0, buffer), rng
        self.arrays: list[np.ndarray] | None = None
        self.n = 0
        self.emitted = 0

    def _append(self, chunk: tuple) -> None:
        k = len(chunk[0])
        if self.arrays is None:
            cap = max(self.buffer, self.batch_size) + max(k, self.batch_size)
            self.arrays = [np.empty((cap, *a.shape[1:]), a.dtype) for a in chunk]
        need = self.n + k
        if need > len(self.arrays[0]):  # a larger chunk than seen so far: grow once
            cap = max(need, 2 * len(self.arrays[0]))
            self.arrays = [np.concatenate([a[:self.n], np.empty((cap - self.n, *a.shape[1:]), a.dtype)])
                           for a in self.arrays]
        for a, c in zip(self.arrays, chunk):
            a[self.n:need] = c
        self.n = need

    def _take(self, count: int) -> tuple:
        """`count` samples removed from the buffer: random ones, or the oldest without shuffling."""
        n, arrays = self.n, self.arrays
        if self.buffer <= 1:
            out = tuple(a[:count].copy() for a in arrays)
            for a in arrays:
                a[:n - count] = a[count:n]
        else:
            pick = _distinct(self.rng, n, count)
            out = tuple(a[pick] for a in arrays)
            # Fill the holes below the new end with the unpicked samples above it.
            tail = np.ones(count, bool)
            above = pick[pick >= n - count] - (n - count)
            tail[above] = False
            holes, movers = np.sort(pick[pick < n - count]), np.flatnonzero(tail) + (n - count)
            for a in arrays:
                a[holes] = a[movers]
        self.n -= count
        return out

    def push(self, chunk: tuple) -> list[tuple]:
        self._append(chunk)
        ready = []
        while self.n >= self._fill() + self.batch_size:
            ready.append(self._take(self.batch_size))
            self.emitted += self.batch_size
        return ready

    def _fill(self) -> int:
        """Samples to keep in the buffer: a fifth of it for the first batch, then as many more as have
        been emitted, up to all of it (webdataset's `initial`): an epoch's first batch comes after about
        a fifth of the buffer, not all of it, while intake outpaces output until the buffer is full."""
        if self.buffer <= 1:
            return 0
        return min(self.buffer, self.buffer // 5 + self.emitted)

    def drain(self) -> tuple[list[tuple], tuple | None]:
        ready = []
        while self.n >= self.batch_size:
            ready.append(self._take(self.batch_size))
        rest = self._take(self.n) if self.n else None
        return ready, rest


def _distinct(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """`count` distinct positions out of `n`, uniformly at random, in random order.

    `Generator.choice(replace=False)` permutes all `n` (O(n) per batch); with n well above count,
    drawing with replacement and keeping first occurrences costs O(count log count)."""
    if n < 4 * count:
        return rng.permutation(n)[:count]
    while True:
        draw = rng.integers(0, n, count + count // 4 + 8)
        _, first = np.unique(draw, return_index=True)
        if len(first) >= count:
            return draw[np.sort(first)][:count]


def concat(chunks: list[tuple]) -> tuple:
    return tuple(np.concatenate(parts) for parts in zip(*chunks))


def rechunk(chunks: Iterable[tuple], size: int | None) -> Iterator[tuple]:
    """The same samples in chunks of exactly `size` (the last may be shorter); unchanged when None."""
    if size is None:
        yield from chunks
        return
    held, n = [], 0
    for chunk in chunks:
        held.append(chunk)
        n += len(chunk[0])
        while n >= size:
            whole = concat(held)
            yield tuple(a[:size] for a in whole)
            held, n = ([tuple(a[size:] for a in whole)] if n > size else []), n - size
    if n:
        yield concat(held)
