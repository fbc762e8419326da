"""The shared-memory ring through which DataLoader workers hand groups of batches to the main process."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class _SlotRing:
    """Shared-memory slots, allocated once before the workers start, through which workers hand batches
    to the main process: a fresh shared-memory tensor per item costs about 2.5 ms per MB here (segment
    creation, page faults on both sides), a copy into a mapped slot a small fraction of that.

    Worker w writes its j-th item into slot j % n_slots. The DataLoader keeps at most
    prefetch_factor x num_workers items outstanding, and the main process copies an item out as it
    arrives, so with n_slots beyond that bound a slot is never rewritten before it has been read.
    uint8 images: a quarter of the bytes of float32.
    """

    def __init__(self, workers: int, n_slots: int, capacity: int, shape: tuple):
        self.x = torch.empty((workers, n_slots, capacity, *shape), dtype=torch.uint8).share_memory_()
        self.y = torch.empty((workers, n_slots, capacity), dtype=torch.long).share_memory_()
        self.idx = torch.empty((workers, n_slots, capacity), dtype=torch.long).share_memory_()
        self.written = [0] * workers  # in each worker process, only its own entry moves

    def put(self, worker: int, x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[int, int, int]:
        slot, n = self.written[worker] % self.x.shape[1], len(x)
        self.written[worker] += 1
        self.x[worker, slot, :n].numpy()[...] = x
        self.y[worker, slot, :n].numpy()[...] = y
        self.idx[worker, slot, :n].numpy()[...] = idx
        return worker, slot, n

    def take(self, where: tuple[int, int, int], pin: bool) -> tuple[Tensor, Tensor, Tensor]:
        worker, slot, n = where
        out = []
        for a in (self.x, self.y, self.idx):
            src = a[worker, slot, :n]
            out.append(torch.empty(src.shape, dtype=src.dtype, pin_memory=pin).copy_(src))
        return tuple(out)
