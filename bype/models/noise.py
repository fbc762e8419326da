"""Training noise keyed by global batch rows.

Each step draws the noise of the whole global batch from one generator seeded by (seed, epoch, step),
and every rank keeps its own rows. So a run's randomness does not depend on how many ranks share the
batch (2 processes reproduce 1 process), and a resumed run replays the same noise.
"""
from __future__ import annotations

import torch

from bype.seeds import derive_seed


class RowNoise:
    def __init__(self, seed: int, epoch: int, step: int, rank: int = 0, world_size: int = 1):
        self.generator = torch.Generator().manual_seed(derive_seed("bype-noise", seed, epoch, step))
        self.rank, self.world_size = rank, world_size

    def _draw(self, fn, like: torch.Tensor) -> torch.Tensor:
        shape = (like.shape[0] * self.world_size, *like.shape[1:])
        part = fn(shape, generator=self.generator, dtype=like.dtype)[self.rank::self.world_size]
        if like.device.type == "cuda":  # from pinned memory the copy need not hold the host until it is done
            return part.pin_memory().to(like.device, non_blocking=True)
        return part.to(like.device)

    def randn_like(self, like: torch.Tensor) -> torch.Tensor:
        return self._draw(torch.randn, like)

    def rand_like(self, like: torch.Tensor) -> torch.Tensor:
        return self._draw(torch.rand, like)
