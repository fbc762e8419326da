"""The public loader: `ShardStream` checks its settings, fixes the steps per epoch, runs the readers
(in persistent DataLoader workers or in-process), cuts their groups into batches, and counts, logs or
raises what they report; `to_float` converts stored uint8 images to float32."""
from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from bype.parallel.process_group import rank_and_world
from ..manifest import manifest_layout
from .reader import ShardError, _Reader, available_cpus
from .spec import resolve_shards

log = logging.getLogger("bype.data")

MODES = ("resample", "exact")


class ShardStream:
    """Batches `(x, y, idx)` streamed from shards; `len(stream)` steps per epoch on every rank.

    See the package docstring (`bype.data.stream`) for specs, layouts, modes, ordering and error handling.
    """

    def __init__(self, spec, *, split: str = "train", batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, num_workers: int = 2, mode: str = "resample",
                 samples_per_epoch: int | None = None, shuffle_buffer: int = 5000, on_error: str = "skip",
                 pin_memory: bool | None = None, prefetch_factor: int = 2, pad: str = "flag", manifest=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if pad not in ("flag", "wrap"):
            raise ValueError(f"pad must be 'flag' or 'wrap', got {pad!r}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        if rank is None or world_size is None:
            dist_rank, dist_world = rank_and_world()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        cpus = available_cpus()
        if num_workers > cpus:  # more workers than cores only adds contention (and a torch warning)
            log.info("data.num_workers: %d capped at the %d CPU core(s) available", num_workers, cpus)
            num_workers = cpus
        self.spec, self.split, self.mode, self.on_error, self.pad = spec, split, mode, on_error, pad
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.prefetch_factor = num_workers, shuffle_buffer, prefetch_factor
        # Pinned host memory only helps (and only exists) with CUDA.
        self.pin_memory = torch.cuda.is_available() and (pin_memory is None or bool(pin_memory))
        self.urls, self.counts, self.manifest = resolve_shards(spec, split, manifest)
        if not self.urls:
            raise ValueError(f"{spec}: no shards for split {split!r}")
        self.shape = tuple(self.manifest["shape"]) if self.manifest else None
        self.layout = manifest_layout(self.manifest) if self.manifest else None
        self.block_size = self.manifest.get("block_size") if self.layout == "blocks" else None
        # Batches per worker -> main process transfer: fewer, larger messages (about 1 MB of images).
        sample_bytes = int(np.prod(self.shape)) if self.shape else 784
        self.group = max(1, min(16, (1 << 20) // max(1, batch_size * sample_bytes))) if num_workers else 1
        known = None if any(c is None for c in self.counts) else sum(self.counts)
        if mode == "exact":
            if known is None:
                missing = self.urls[self.counts.index(None)]
                raise ValueError(f"{missing}: exact mode needs per-shard sample counts from a manifest.json "
                                 f"(beside the shards or passed as manifest=); or use mode='resample'")
            if known == 0:
                raise ValueError(f"{spec}: split {split!r} has no samples")
            self.samples_per_epoch = known
            self._steps = math.ceil(known / (world_size * batch_size))
        else:
            self.samples_per_epoch = samples_per_epoch or known
            if not self.samples_per_epoch:
                raise ValueError(f"{spec}: resample mode needs samples_per_epoch (no manifest gives the split size)")
            self._steps = max(1, math.ceil(self.samples_per_epoch / (world_size * batch_size)))
        self.errors = {"shard": 0, "block": 0, "sample": 0}
        self.padded = 0
        self._warned: set[str] = set()
        self._reader = _Reader(self)
        self._loader = None

    def __len__(self) -> int:
        return self._steps

    def __repr__(self) -> str:
        return (f"ShardStream({len(self.urls)} shards, split={self.split!r}, mode={self.mode!r}, "
                f"rank={self.rank}/{self.world_size}, batch={self.batch_size}, steps={self._steps})")

    def _items(self):
        if self.num_workers == 0:
            return iter(self._reader)
        if self._loader is None:  # workers start once and serve every epoch
            self._loader = torch.utils.data.DataLoader(
                self._reader, batch_size=None, num_workers=self.num_workers, pin_memory=False,  # see _take
                prefetch_factor=self.prefetch_factor, persistent_workers=True)
        return iter(self._loader)

    def _absorb(self, events: list) -> None:
        for kind, message in events:
            if kind == "fatal":
                raise ShardError(message)
            if kind == "padded":
                self.padded += int(message)
                continue
            self.errors[kind] = self.errors.get(kind, 0) + 1
            # Resampling draws a bad shard again and again: warn once per message, count every time.
            level = logging.DEBUG if message in self._warned else logging.WARNING
            self._warned.add(message)
            log.log(level, "skipped %s: %s", kind, message)

    def raw_epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches of `epoch` as stored: `x` uint8 [B, C, H, W] (pinned when pinning), `y`, `idx`.

        For a device-side conversion (`bype.data.device_batches`); `epoch` gives floats.
        """
        self.padded = 0
        self._reader.epoch_box[0] = epoch
        steps, B = 0, self.batch_size
        for slot, x, y, idx, events in self._items():
            self._absorb(events)
            if slot is not None:  # copied out of the worker's slot at once (straight into pinned memory)
                x, y, idx = self._reader.ring.take(slot, self.pin_memory)
            elif self.pin_memory:
                x, y, idx = x.pin_memory(), y.pin_memory(), idx.pin_memory()
            for k in range(0, len(x), B):
                if steps == self._steps:
                    break
                steps += 1
                yield x[k:k + B], y[k:k + B], idx[k:k + B]
            if steps == self._steps and self.mode == "resample":
                break  # resample readers never end; the next pass restarts them
        if steps != self._steps:  # cannot happen by construction; a hang elsewhere would be worse
            raise RuntimeError(f"rank {self.rank} produced {steps} steps in epoch {epoch}, expected {self._steps}")

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches of `epoch` for this rank: exactly `len(self)` of `batch_size` samples each, x float32."""
        for x, y, idx in self.raw_epoch(epoch):
            yield to_float(x, pin=self.pin_memory), y, idx

    def __iter__(self):
        return self.epoch(0)


def to_float(x: Tensor, pin: bool = False) -> Tensor:
    """uint8 grey levels -> float32 in [0, 1] in one pass (into pinned memory when `pin`)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, pin_memory=pin and x.device.type == "cpu")
    return torch.div(x, 255.0, out=out)

