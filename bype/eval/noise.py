"""Evaluation noise keyed by (seed, split, example index, sample index, draw, coordinate).

The importance samples and the fixed binarisation of an evaluation must not depend on how the examples
are cut into chunks (the memory budget decides that) or shared between ranks (sharded evaluation), so
each number is a function of its key alone: a SplitMix64 hash of the key (counter-based, like Philox or
JAX's keys) turned into a uniform (24 or 53 bits) or, by Box-Muller, a normal. Pure torch integer
arithmetic, so it is the same on every device.
"""
from __future__ import annotations

import math

import torch

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # the SplitMix64 increment, as a signed int64
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser (int64 arithmetic wraps)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def keyed_bits(*parts) -> torch.Tensor:
    """64 random bits per element of the broadcast of `parts` (ints or int64 tensors)."""
    device = next((p.device for p in parts if isinstance(p, torch.Tensor)), None)
    h = torch.zeros((), dtype=torch.int64, device=device)
    for p in parts:  # a chain of SplitMix64 streams: the state of each is the hash of the parts before
        h = _mix(h + (torch.as_tensor(p, dtype=torch.int64, device=device) + 1) * _GOLDEN)
    return h


def uniform_from_bits(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in (0, 1), never 0 or 1: the top 53 bits (float64) or 24 bits (float32 and below)."""
    bits = 53 if dtype == torch.float64 else 24
    return ((_shr(h, 64 - bits).to(torch.float64) + 0.5) / 2.0**bits).to(dtype)


def normal_from_bits(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Box-Muller on the two 32-bit halves of h, in float64."""
    u1 = (_shr(h, 32).to(torch.float64) + 0.5) / 2.0**32
    u2 = ((h & 0xFFFFFFFF).to(torch.float64) + 0.5) / 2.0**32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)


class IndexNoise:
    """The noise of one evaluation chunk: examples `index` [b] of a split, samples s0 .. s1-1 of
    each (rows example-major, samples adjacent, as `log_weights_is` lays them out). Each call is one
    draw (z2, then z1, ...), numbered in order, so a model's successive draws differ."""

    def __init__(self, seed: int, stream: int, index: torch.Tensor, s0: int = 0, s1: int = 1):
        self.seed, self.stream, self.s0, self.s1 = seed, stream, s0, s1
        self.index = index.to(torch.int64).cpu()
        self.draws = 0

    def _bits(self, like: torch.Tensor) -> torch.Tensor:
        n_s = self.s1 - self.s0
        if like.shape[0] != self.index.shape[0] * n_s:
            raise ValueError(f"noise: expected {self.index.shape[0]} x {n_s} rows, got shape {list(like.shape)}")
        cols, dev = like[0].numel(), like.device
        ex = self.index.to(dev)[:, None, None]
        sample = torch.arange(self.s0, self.s1, dtype=torch.int64, device=dev)[None, :, None]
        col = torch.arange(cols, dtype=torch.int64, device=dev)[None, None, :]
        self.draws += 1
        return keyed_bits(self.seed, self.stream, self.draws, ex, sample, col).reshape(like.shape)

    def randn_like(self, like: torch.Tensor) -> torch.Tensor:
        return normal_from_bits(self._bits(like), like.dtype)

    def rand_like(self, like: torch.Tensor) -> torch.Tensor:
        return uniform_from_bits(self._bits(like), like.dtype)
