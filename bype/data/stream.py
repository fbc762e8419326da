"""Streaming loader over webdataset tar shards with equal steps per rank.

A `ShardStream` yields batches `(x, y, idx)`: `x` float32 [B, C, H, W] in [0, 1], `y` long labels, `idx`
long global index within the split (-1 when a shard does not store it). Every batch has exactly
`batch_size` samples and every rank gets exactly `len(stream)` batches per epoch, whatever the shard
sizes, so DDP collectives never wait on a rank that ran out of data.

Shard specs
    A prepared directory (or its `manifest.json`); local paths; brace patterns
    (`data/train-{000000..000007}.tar`); several specs joined by `::` or given as a list; http(s) URLs;
    `pipe:` commands (`pipe:aws s3 cp s3://bucket/train-000000.tar -`). All are read with webdataset.
    Per-shard sample counts come from the manifest: the directory's own, the `manifest.json` beside the
    first shard, or the one passed as `manifest=`.

Modes
    `resample` (default): every reader (rank x DataLoader worker) draws shards with replacement from
        all shards (webdataset `ResampledShards`) and the epoch is cut at a fixed length on the loader
        (`WebLoader.with_epoch`: on the loader, not the dataset, where it would count per worker).
        `samples_per_epoch` (default: the split size) gives `len = ceil(samples_per_epoch / (world_size
        * batch_size))` steps. Within an epoch a sample may be seen twice or not at all; over epochs
        every sample is seen equally often in expectation. Needs no counts when `samples_per_epoch` is
        given; works with any number of shards, even one.
    `exact`: each sample exactly once per epoch across all ranks. The shards, shuffled by
        (seed, epoch) identically on every rank, are concatenated and cut into one contiguous range
        per reader (rank-major, then worker), so a shard can be shared by readers, each reading its own
        slice: fewer shards than readers is fine. A reader streams (without decoding) the part of a
        shard before its slice, so the extra I/O per epoch is at most one shard per reader.
        `len = ceil(N / (world_size * batch_size))`; a rank's `len * batch_size` slots exceed its share
        of N by less than `batch_size + 1` samples, filled with padding: copies of samples the reader
        already yielded, placed in its last batch. With `pad="flag"` (default) a padding sample's idx
        is `-2 - idx` (see `is_padding`, `true_index`): mask it out of the loss to count every sample
        exactly once. With `pad="wrap"` its idx is unchanged (like DistributedSampler: a few samples
        count twice per epoch). A reader whose samples were all unreadable pads with zero images,
        y = idx = -1. `stream.padded` is the number of padding samples this rank received last epoch.

Order
    Shard order and the sample shuffle buffer are seeded by (seed, epoch, rank, worker): the same
    (seed, epoch) gives the same batches; epochs differ. The order also depends on world_size and
    num_workers (they define the readers).

Errors
    A shard that cannot be opened or read (missing, truncated, corrupt tar, fewer samples than its
    manifest count) and a sample that cannot be decoded (broken image, missing or bad field, wrong
    shape) are skipped, counted in `stream.errors` ({"shard": n, "sample": n}) and logged with their
    names on logger "bype.data" (in the main process, also for worker errors). The epoch keeps its step
    count (resample: reading goes on; exact: the reader pads). `on_error="raise"` fails the run instead,
    with a message naming the shard.
"""
from __future__ import annotations

import io
import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from webdataset.tariterators import group_by_keys, tar_file_expander

from .manifest import load_manifest, manifest_location, sha256_file, split_entry

__all__ = ["ShardStream", "load_manifest", "load_split_in_memory", "manifest_stats", "is_padding", "true_index",
           "exact_plan"]

log = logging.getLogger("bype.data")

MODES = ("resample", "exact")
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp")
_MAX_EMPTY_DRAWS = 64  # resample: consecutive shard draws without a sample before giving up (no hang)
_MAX_BAD_SAMPLES = 10_000  # resample: consecutive undecodable samples before giving up


def is_padding(idx: Tensor) -> Tensor:
    """True where `idx` marks a padding sample of exact mode with pad="flag"."""
    return idx <= -2


def true_index(idx: Tensor) -> Tensor:
    """The sample index behind a flagged padding idx (unchanged for ordinary samples)."""
    return torch.where(idx <= -2, -2 - idx, idx)


# --- shard specs -------------------------------------------------------------------------------------

def _shard_basename(url: str) -> str:
    """`train-000003.tar` out of a path, URL or `pipe:` command (its last word)."""
    last = url.split()[-1] if url.startswith("pipe:") else url
    return last.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def _manifest_base(location: str) -> str:
    return location.rsplit("/", 1)[0] if "/" in location else "."


def resolve_shards(spec, split: str, manifest=None) -> tuple[list[str], list[int | None], dict | None]:
    """Shard URLs, their sample counts (None when unknown) and the manifest, if any, for `spec`."""
    if isinstance(spec, (list, tuple)):
        urls = [u for s in spec for u in wds.shardlists.expand_urls(str(s))]
    else:
        spec = os.fspath(spec)
        location = manifest_location(spec)
        if location is not None and (spec.endswith((".json", "/")) or os.path.isdir(spec)):
            m = manifest if isinstance(manifest, dict) else load_manifest(spec)
            entry = split_entry(m, split, location)
            base = _manifest_base(location)
            return [f"{base}/{s['name']}" for s in entry["shards"]], [s["count"] for s in entry["shards"]], m
        urls = wds.shardlists.expand_urls(spec)
    if isinstance(manifest, (str, os.PathLike)):
        manifest = load_manifest(os.fspath(manifest))
    elif manifest is None:
        location = manifest_location(urls[0]) if urls else None
        if location is not None:
            try:
                manifest = load_manifest(location)
            except (OSError, ValueError):
                manifest = None  # counts stay unknown: fine for resample with samples_per_epoch
    counts: list[int | None] = [None] * len(urls)
    if manifest is not None:
        known = {s["name"]: s["count"] for e in manifest["splits"].values() for s in e["shards"]}
        counts = [known.get(_shard_basename(u)) for u in urls]
    return urls, counts, manifest


# --- exact-mode plan ---------------------------------------------------------------------------------

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


# --- reading and decoding (runs in DataLoader workers) -----------------------------------------------

class _ShardError(Exception):
    pass


class _Fatal(Exception):
    """Stops a reader; delivered to the main process as an item, raised there as RuntimeError."""


def _read_shard(url: str, start: int = 0, stop: int | None = None, expected: int | None = None):
    """Raw samples (dicts of bytes) at positions [start, stop) of one shard; _ShardError if unreadable."""
    stream, pos, finished = None, 0, False
    try:
        stream = wds.gopen(url, "rb")
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            if stop is not None and pos >= stop:
                break
            if pos >= start:
                yield sample
            pos += 1
        else:
            finished = True
    except GeneratorExit:
        raise
    except Exception as e:
        raise _ShardError(f"{url}: unreadable shard after {pos} samples ({type(e).__name__}: {_first_arg(e)})") from e
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:
                # A pipe we stopped reading early may exit non-zero; only a complete read must close cleanly.
                if finished:
                    raise _ShardError(f"{url}: {_first_arg(e)}") from e
    want = stop if stop is not None else expected
    if want is not None and pos < want:
        raise _ShardError(f"{url}: truncated shard: {pos} samples, expected {want}")


def _first_arg(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)


def decode_sample(sample: dict, shape: tuple | None) -> tuple[np.ndarray, int, int]:
    """(uint8 [C, H, W], label, idx) of a raw webdataset sample; ValueError when broken."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"no image field (has {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        img = Image.open(io.BytesIO(sample[field]))
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if shape is not None and shape[0] == 1 else "RGB")
        x = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises many types on broken data
        raise ValueError(f"broken {field} image ({type(e).__name__}: {_first_arg(e)})") from e
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"image shape {list(x.shape)}, expected {list(shape)}")
    try:
        y = int(sample["cls"]) if "cls" in sample else -1
        idx = int(sample["idx"]) if "idx" in sample else -1
    except ValueError as e:
        raise ValueError(f"bad cls/idx field ({e})") from e
    return x, y, idx


def _collate(items: list[tuple[np.ndarray, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    # uint8 across the worker -> main process boundary: a quarter of the bytes of float32.
    x = torch.from_numpy(np.stack([it[0] for it in items]))
    y = torch.tensor([it[1] for it in items], dtype=torch.long)
    idx = torch.tensor([it[2] for it in items], dtype=torch.long)
    return x, y, idx


def _reader_seed(rank: int) -> int:
    """Seed component of a reader for ResampledShards: our rank (not the env's), and the worker id."""
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


class _EpochReader(torch.utils.data.IterableDataset):
    """One epoch of one rank; each DataLoader worker reads its own part and yields whole batches.

    Items are `(x, y, idx, events)`: `events` carries skipped-data reports to the main process, where
    they are counted and logged (worker processes have no view of the caller's logging).
    """

    def __init__(self, s: "ShardStream", epoch: int):
        super().__init__()
        self.urls, self.counts, self.shape = s.urls, s.counts, s.shape
        self.mode, self.on_error, self.pad = s.mode, s.on_error, s.pad
        self.rank, self.world_size, self.num_workers = s.rank, s.world_size, s.num_workers
        self.batch_size, self.buffer, self.seed, self.epoch = s.batch_size, s.shuffle_buffer, s.seed, epoch
        self.events: list[tuple[str, str]] = []

    def _worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        return info.id if info is not None else 0

    def _report(self, kind: str, message: str) -> None:
        if self.on_error == "raise":
            raise _Fatal(message)
        self.events.append((kind, message))

    def _take_events(self) -> list:
        events, self.events = self.events, []
        return events

    def _samples(self, segments) -> Iterator[dict]:
        """Raw samples of (url, start, stop, expected) segments; unreadable shards are reported."""
        empty_run = 0
        for url, start, stop, expected in segments:
            got = 0
            try:
                for sample in _read_shard(url, start, stop, expected):
                    got += 1
                    yield sample
            except _ShardError as e:
                self._report("shard", str(e))
            empty_run = 0 if got else empty_run + 1
            if self.mode == "resample" and empty_run >= _MAX_EMPTY_DRAWS:
                raise _Fatal(f"{empty_run} shard draws in a row gave no samples (last: {url}); "
                             f"are the shards empty or unreadable?")

    def _decoded(self, raw: Iterator[dict]) -> Iterator[tuple[np.ndarray, int, int]]:
        bad_run = 0
        for sample in raw:
            try:
                item = decode_sample(sample, self.shape)
            except ValueError as e:
                self._report("sample", f"{sample.get('__url__')}: sample {sample.get('__key__')}: {e}")
                bad_run += 1
                if self.mode == "resample" and bad_run >= _MAX_BAD_SAMPLES:
                    raise _Fatal(f"{bad_run} undecodable samples in a row (last: {sample.get('__url__')}); "
                                 f"giving up") from e
                continue
            bad_run = 0
            yield item

    def _shuffled(self, raw: Iterator[dict], worker: int) -> Iterator[dict]:
        if self.buffer <= 1:
            return raw
        seed = _rng_seed(self.seed, self.epoch, self.rank, worker, 1)
        return wds.shuffle(self.buffer, initial=self.buffer, seed=seed)(raw)

    def __iter__(self):
        worker = self._worker()
        self.events = []
        try:
            if self.mode == "resample":
                yield from self._iter_resample(worker)
            else:
                yield from self._iter_exact(worker)
        except _Fatal as e:
            # Raising inside a DataLoader worker garbles the message and stalls worker shutdown;
            # end this reader cleanly and let the main process raise.
            yield None, None, None, [("fatal", str(e))]

    def _iter_resample(self, worker: int):
        shards = wds.ResampledShards(self.urls, seed=_rng_seed(self.seed, self.epoch), deterministic=True,
                                     worker_seed=partial(_reader_seed, self.rank))
        expected = dict(zip(self.urls, self.counts))
        segments = ((d["url"], 0, None, expected[d["url"]]) for d in shards)
        batch = []
        for item in self._decoded(self._shuffled(self._samples(segments), worker)):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield (*_collate(batch), self._take_events())
                batch = []

    def _iter_exact(self, worker: int):
        # Each batch is released only once the next one has started (or reading is over), so reports
        # found while finishing a shard travel with a batch: the exact step count leaves no spare item.
        pending = None
        for batch in self._exact_batches(worker):
            if pending is not None:
                yield (*_collate(pending), self._take_events())
            pending = batch
        if pending is not None:
            yield (*_collate(pending), self._take_events())

    def _exact_batches(self, worker: int) -> Iterator[list]:
        _, plan = exact_plan(self.counts, seed=self.seed, epoch=self.epoch, world_size=self.world_size,
                             num_workers=self.num_workers, batch_size=self.batch_size)
        segments, slots = plan[(self.rank, worker)]
        if slots == 0:
            return
        raw = self._samples((self.urls[s], a, b, None) for s, a, b in segments)
        batch, pool, served = [], [], 0
        for item in self._decoded(self._shuffled(raw, worker)):
            if len(pool) < self.batch_size:
                pool.append(item)  # padding material: the first samples this reader served
            batch.append(item)
            served += 1
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        n_pad = slots - served
        if n_pad:
            self.events.append(("padded", str(n_pad)))
        for j in range(n_pad):
            if pool:
                x, y, idx = pool[j % len(pool)]
                batch.append((x, y, -2 - idx if self.pad == "flag" and idx >= 0 else idx))
            else:
                batch.append((np.zeros(self.shape, np.uint8), -1, -1))
            if len(batch) == self.batch_size:
                yield batch
                batch = []


# --- the public loader ---------------------------------------------------------------------------------

def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream:
    """Batches `(x, y, idx)` streamed from shards; `len(stream)` steps per epoch on every rank.

    See the module docstring for specs, modes, ordering and error handling.
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
            dist_rank, dist_world = _dist_rank_world()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.spec, self.split, self.mode, self.on_error, self.pad = spec, split, mode, on_error, pad
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.prefetch_factor = num_workers, shuffle_buffer, prefetch_factor
        # Pinned host memory only helps (and only exists) with CUDA.
        self.pin_memory = torch.cuda.is_available() and (pin_memory is None or bool(pin_memory))
        self.urls, self.counts, self.manifest = resolve_shards(spec, split, manifest)
        if not self.urls:
            raise ValueError(f"{spec}: no shards for split {split!r}")
        self.shape = tuple(self.manifest["shape"]) if self.manifest else None
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
        self.errors = {"shard": 0, "sample": 0}
        self.padded = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return self._steps

    def __repr__(self) -> str:
        return (f"ShardStream({len(self.urls)} shards, split={self.split!r}, mode={self.mode!r}, "
                f"rank={self.rank}/{self.world_size}, batch={self.batch_size}, steps={self._steps})")

    def _loader(self, epoch: int) -> wds.WebLoader:
        kwargs = dict(batch_size=None, num_workers=self.num_workers, pin_memory=False)  # pinned in _finish
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        loader = wds.WebLoader(_EpochReader(self, epoch), **kwargs)
        # Resample streams never end: cut the epoch on the loader, where it counts batches of this rank.
        return loader.with_epoch(self._steps) if self.mode == "resample" else loader

    def _finish(self, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 -> float32 in [0, 1] in one pass, written straight into pinned memory when pinning."""
        out = torch.empty(x.shape, dtype=torch.float32, pin_memory=self.pin_memory)
        torch.div(x, 255.0, out=out)
        if self.pin_memory:
            y, idx = y.pin_memory(), idx.pin_memory()
        return out, y, idx

    def _absorb(self, events: list) -> None:
        for kind, message in events:
            if kind == "fatal":
                raise RuntimeError(message)
            if kind == "padded":
                self.padded += int(message)
                continue
            self.errors[kind] = self.errors.get(kind, 0) + 1
            # Resampling draws a bad shard again and again: warn once per message, count every time.
            level = logging.DEBUG if message in self._warned else logging.WARNING
            self._warned.add(message)
            log.log(level, "skipped %s: %s", kind, message)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches of `epoch` for this rank: exactly `len(self)` of `batch_size` samples each."""
        self.padded = 0
        steps = 0
        for x, y, idx, events in self._loader(epoch):
            self._absorb(events)
            steps += 1
            yield self._finish(x, y, idx)
        if steps != self._steps:  # cannot happen by construction; a hang elsewhere would be worse
            raise RuntimeError(f"rank {self.rank} produced {steps} steps in epoch {epoch}, expected {self._steps}")

    def __iter__(self):
        return self.epoch(0)


def manifest_stats(manifest: dict, split: str = "train") -> dict:
    """The split's sufficient statistics as tensors: `n` int, `sum_x` float64 [D], `sum_sq` float64 scalar."""
    stats = split_entry(manifest, split)["stats"]
    return {"n": int(stats["n"]), "sum_x": torch.tensor(stats["sum_x"], dtype=torch.float64),
            "sum_sq": torch.tensor(stats["sum_sq"], dtype=torch.float64)}


# --- whole splits in memory ------------------------------------------------------------------------------

def load_split_in_memory(directory: str, split: str, *, verify: bool = True,
                         num_threads: int = 4) -> tuple[Tensor, Tensor]:
    """All of a prepared split: images uint8 [N, C, H, W] and labels long [N], in index order.

    For validation / test sets and exemplar banks. With `verify`, each shard's sha256 is checked against
    the manifest first. Raises ValueError naming the shard on any corrupt, missing or duplicate sample.
    """
    m = load_manifest(directory)
    location = manifest_location(os.fspath(directory))
    entry = split_entry(m, split, location)
    base, shape, n = _manifest_base(location), tuple(m["shape"]), entry["count"]
    images = np.zeros((n, *shape), dtype=np.uint8)
    labels = np.full(n, -1, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)

    def load(shard: dict) -> None:
        path = f"{base}/{shard['name']}"
        if verify and sha256_file(path) != shard["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the manifest (corrupt or modified shard)")
        try:
            for sample in _read_shard(path, expected=shard["count"]):
                try:
                    x, y, i = decode_sample(sample, shape)
                except ValueError as e:
                    raise ValueError(f"sample {sample['__key__']}: {e}") from e
                if not 0 <= i < n or seen[i]:
                    raise ValueError(f"sample {sample['__key__']}: idx {i} out of range or duplicate")
                images[i], labels[i], seen[i] = x, y, True
        except (_ShardError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        list(pool.map(load, entry["shards"]))
    if not seen.all():
        raise ValueError(f"{location}: split {split!r} lacks samples, e.g. idx {int(np.flatnonzero(~seen)[0])}")
    return torch.from_numpy(images), torch.from_numpy(labels)
