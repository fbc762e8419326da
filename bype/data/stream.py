"""Streaming loader over webdataset tar shards with equal steps per rank.

A `ShardStream` yields batches `(x, y, idx)`: `x` float32 [B, C, H, W] in [0, 1] (`epoch`) or uint8 as
stored (`raw_epoch`, for a conversion on the device), `y` long labels, `idx` long global index within
the split (-1 when a shard does not store it). Every batch has exactly `batch_size` samples and every
rank gets exactly `len(stream)` batches per epoch, whatever the shard sizes, so DDP collectives never
wait on a rank that ran out of data.

Shard specs
    A prepared directory (or its `manifest.json`); local paths; brace patterns
    (`data/train-{000000..000007}.tar`); several specs joined by `::` or given as a list; http(s) URLs;
    `pipe:` commands (`pipe:aws s3 cp s3://bucket/train-000000.tar -`). All are read with webdataset.
    Per-shard sample counts come from the manifest: the directory's own, the `manifest.json` beside the
    first shard, or the one passed as `manifest=`.

Layouts (`bype.data.records`)
    Block records (many samples per tar member, what `bype data prepare` writes) are read as arrays;
    one-sample records (PNG / JPEG, the webdataset convention) are decoded in the workers. Either way the
    pipeline after reading works on whole arrays: a seeded window of blocks, a seeded buffer of samples
    (`bype.data.shuffle`), batches cut as tensors; workers send groups of batches (about 1 MB) to the main
    process, persistent across epochs; with CUDA the DataLoader pins them.

Modes
    `resample` (default): every reader (rank x DataLoader worker) draws shards with replacement from all
        shards, seeded by (seed, epoch, rank, worker), and the main process cuts the epoch at
        `len = ceil(samples_per_epoch / (world_size * batch_size))` batches. Within an epoch a sample may
        be seen twice or not at all; over epochs every sample is seen equally often in expectation.
        Needs no counts when `samples_per_epoch` is given; works with any number of shards, even one.
    `exact`: each sample exactly once per epoch across all ranks. The shards, shuffled by
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
        y = idx = -1. `stream.padded` is the number of padding samples this rank received last epoch.

Order
    Shard order, block window and sample buffer are seeded by (seed, epoch, rank, worker): the same
    (seed, epoch) gives the same batches, also in a new process (a resumed run); epochs differ. The order
    also depends on world_size and num_workers (they define the readers); num_workers is capped at the
    CPU cores available.

Errors
    A shard that cannot be opened or read (missing, truncated, corrupt tar, fewer samples than its
    manifest count), a block and a sample that cannot be decoded (broken npy / image, missing or bad
    field, wrong shape) are skipped, counted in `stream.errors` ({"shard": n, "block": n, "sample": n})
    and logged with their names on logger "bype.data" (in the main process, also for worker errors).
    The epoch keeps its step count (resample: reading goes on; exact: the reader pads).
    `on_error="raise"` fails the run instead with a `ShardError` (a ValueError: one line on the command
    line) naming the shard. A local shard directory that vanishes during the run (deleted, renamed,
    unmounted) fails it whatever `on_error` says: nothing is left to read, and skipping would train on padding.
"""
from __future__ import annotations

import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from webdataset.tariterators import group_by_keys, tar_file_expander

from bype.parallel.process_group import rank_and_world
from .manifest import is_remote, load_manifest, manifest_layout, manifest_location, sha256_file, split_entry
from .records import decode_block, decode_sample, record_layout, stack_samples
from .shuffle import BatchShuffler, concat, shuffle_chunks

__all__ = ["ShardStream", "ShardError", "load_manifest", "load_split_in_memory", "manifest_stats", "is_padding",
           "true_index", "exact_plan", "verify_shards", "to_float", "decode_sample"]

log = logging.getLogger("bype.data")

MODES = ("resample", "exact")
_MAX_EMPTY_DRAWS = 64  # resample: consecutive shard draws without a sample before giving up (no hang)


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


# --- reading (runs in DataLoader workers) --------------------------------------------------------------

class _ShardError(Exception):
    pass


class ShardError(ValueError):
    """Unreadable or corrupt data under `on_error="raise"` (or a stream that cannot go on): one line naming
    the shard. A ValueError, so the command line reports it as one line."""


def _read_records(url: str):
    """Raw records (dicts of bytes) of one shard in tar order; _ShardError if it cannot be read through."""
    stream, pos, finished = None, 0, False
    try:
        stream = wds.gopen(url, "rb")
        for record in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            yield record
            pos += 1
        finished = True
    except GeneratorExit:
        raise
    except Exception as e:
        raise _ShardError(f"{url}: unreadable shard after {pos} records ({type(e).__name__}: {_first_arg(e)})") from e
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:
                # A pipe we stopped reading early may exit non-zero; only a complete read must close cleanly.
                if finished:
                    raise _ShardError(f"{url}: {_first_arg(e)}") from e


def shard_chunks(url: str, start: int = 0, stop: int | None = None, expected: int | None = None, *,
                 shape=None, block_size: int | None = None, report=None, group: int = 32) -> Iterator[tuple]:
    """Chunks `(x, y, idx)` of the samples at positions [start, stop) of one shard, either layout.

    A broken record is passed to `report(kind, message)` ("block" or "sample") and skipped; a shard that
    cannot be read through, or holds fewer samples than `stop` / `expected`, raises _ShardError. Block
    records wholly before `start` are skipped undecoded when `block_size` is known.
    """
    pos, pending = 0, []
    for record in _read_records(url):
        if stop is not None and pos >= stop:
            break
        name = f"{url}: {'block' if 'x.npy' in record else 'sample'} {record.get('__key__')}"
        if record_layout(record) == "blocks":
            if block_size is not None and pos + block_size <= start:
                pos += block_size
                continue
            try:
                x, y, idx = decode_block(record, shape)
            except ValueError as e:
                report("block", f"{name}: {e}")
                pos += block_size or 0
                continue
            lo, hi = max(0, start - pos), len(x) if stop is None else min(len(x), stop - pos)
            pos += len(x)
            if hi > lo:
                yield x[lo:hi], y[lo:hi], idx[lo:hi]
            continue
        pos += 1
        if pos <= start:
            continue
        try:
            pending.append(decode_sample(record, shape))
        except ValueError as e:
            report("sample", f"{name}: {e}")
            continue
        if len(pending) == group:
            yield stack_samples(pending)
            pending = []
    if pending:
        yield stack_samples(pending)
    want = stop if stop is not None else expected
    if want is not None and pos < want:
        raise _ShardError(f"{url}: truncated shard: {pos} samples, expected {want}")


def _vanished_directory(url: str) -> str | None:
    """The directory of a local shard when that directory no longer exists (deleted, renamed, unmounted
    during the run), else None: remote shards and a single missing file are the skip policy's to handle."""
    if url.startswith("pipe:") or is_remote(url):
        return None
    directory = os.path.dirname(os.path.abspath(url.removeprefix("file:")))
    return None if os.path.isdir(directory) else directory


def _first_arg(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or a SLURM job's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Reader(torch.utils.data.IterableDataset):
    """The reader of one rank; each DataLoader worker reads its own part and yields groups of batches.

    The workers live across epochs (persistent): the epoch to read comes through a shared-memory tensor
    that the main process sets before each pass. Items are `(slot, x, y, idx, events)`: up to `group`
    whole batches, either as tensors (`slot` None) or written into a slot of the shared `ring` (`slot` =
    (worker, slot, n), tensors None); `events` are the skipped-data reports for the main process, where
    they are counted and logged (worker processes have no view of the caller's logging).
    """

    def __init__(self, s: "ShardStream"):
        super().__init__()
        self.urls, self.counts, self.shape = s.urls, s.counts, s.shape
        self.mode, self.on_error, self.pad = s.mode, s.on_error, s.pad
        self.rank, self.world_size, self.num_workers = s.rank, s.world_size, s.num_workers
        self.batch_size, self.buffer, self.seed = s.batch_size, s.shuffle_buffer, s.seed
        self.block_size, self.group = s.block_size, s.group
        self.epoch_box = torch.zeros(1, dtype=torch.long).share_memory_()
        self.ring = _SlotRing(s.num_workers, s.prefetch_factor * s.num_workers + 2, s.group * s.batch_size,
                              s.shape) if s.num_workers and s.shape else None
        self.events: list[tuple[str, str]] = []
        self.epoch = 0  # the epoch being read (for messages)

    def _report(self, kind: str, message: str) -> None:
        if self.on_error == "raise":
            raise _Fatal(message)
        self.events.append((kind, message))

    def _take_events(self) -> list:
        events, self.events = self.events, []
        return events

    def _chunks(self, segments) -> Iterator[tuple]:
        """Chunks of (url, start, stop, expected) segments; unreadable shards are reported."""
        empty_run = 0
        for url, start, stop, expected in segments:
            got = 0
            try:
                for chunk in shard_chunks(url, start, stop, expected, shape=self.shape, block_size=self.block_size,
                                          report=self._report):
                    got += len(chunk[0])
                    yield chunk
            except _ShardError as e:
                gone = _vanished_directory(url)
                if gone is not None:  # not one bad shard to skip: every later one is gone too
                    raise _Fatal(f"{gone}: the shard directory vanished while epoch {self.epoch} was read "
                                 f"({_shard_basename(url)} is gone); the shards must stay in place for the whole "
                                 "run") from e
                self._report("shard", str(e))
            empty_run = 0 if got else empty_run + 1
            if self.mode == "resample" and empty_run >= _MAX_EMPTY_DRAWS:
                raise _Fatal(f"{url}: {empty_run} shard draws in a row gave no samples; "
                             f"are the shards empty or unreadable?")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, epoch = (info.id if info is not None else 0), int(self.epoch_box[0])
        self.epoch = epoch
        self.events = []
        rng = np.random.default_rng(_rng_seed(self.seed, epoch, self.rank, worker, 1))
        try:
            if self.mode == "resample":
                batches = self._resample_batches(epoch, worker, rng)
            else:
                batches = self._exact_batches(epoch, worker, rng)
            yield from self._items(batches)
        except _Fatal as e:
            # Raising inside a DataLoader worker garbles the message and stalls worker shutdown;
            # end this reader cleanly and let the main process raise.
            yield None, None, None, None, [("fatal", str(e))]

    def _items(self, batches: Iterator[tuple]):
        """Groups of `group` batches as tensors. A group is released only once the next batch exists (or
        reading is over), so reports found while finishing a shard travel with it: exact mode has no
        spare item to carry them."""
        held: list[tuple] = []
        for batch in batches:
            if len(held) == self.group:
                yield self._item(held)
                held = []
            held.append(batch)
        if held:
            yield self._item(held)

    def _item(self, batches: list[tuple]) -> tuple:
        x, y, idx = concat(batches) if len(batches) > 1 else batches[0]
        if self.ring is not None:
            info = torch.utils.data.get_worker_info()
            return self.ring.put(info.id if info is not None else 0, x, y, idx), None, None, None, self._take_events()
        return None, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), torch.from_numpy(idx), \
            self._take_events()

    def _shuffled(self, chunks, rng) -> tuple[Iterator[tuple], BatchShuffler]:
        # Whole blocks are shuffled as units first (a window of a quarter of the buffer's samples: it
        # fills before the first batch); decoded single samples go straight to the sample buffer.
        window = self.buffer // (4 * self.block_size) if self.buffer > 1 and self.block_size else 0
        return shuffle_chunks(chunks, window, rng), BatchShuffler(self.batch_size, self.buffer, rng)

    def _resample_batches(self, epoch: int, worker: int, rng):
        draw = random.Random(_rng_seed(self.seed, epoch, self.rank, worker, 2))
        expected = dict(zip(self.urls, self.counts))
        segments = ((u, 0, None, expected[u]) for u in iter(lambda: draw.choice(self.urls), None))
        chunks, shuffler = self._shuffled(self._chunks(segments), rng)
        for chunk in chunks:
            yield from shuffler.push(chunk)

    def _exact_batches(self, epoch: int, worker: int, rng):
        _, plan = exact_plan(self.counts, seed=self.seed, epoch=epoch, world_size=self.world_size,
                             num_workers=self.num_workers, batch_size=self.batch_size)
        segments, slots = plan[(self.rank, worker)]
        if slots == 0:
            return
        chunks, shuffler = self._shuffled(self._chunks((self.urls[s], a, b, None) for s, a, b in segments), rng)
        first, served = None, 0
        for chunk in chunks:
            for batch in shuffler.push(chunk):
                first = batch if first is None else first
                served += len(batch[0])
                yield batch
        ready, rest = shuffler.drain()
        for batch in ready:
            first = batch if first is None else first
            served += len(batch[0])
            yield batch
        tail = [rest] if rest is not None else []
        served += len(rest[0]) if rest is not None else 0
        first = first if first is not None else rest
        n_pad = slots - served
        if n_pad:
            self.events.append(("padded", str(n_pad)))
            tail.append(self._padding(first, n_pad))
        if tail:
            x, y, idx = concat(tail)
            for k in range(0, len(x), self.batch_size):
                yield x[k:k + self.batch_size], y[k:k + self.batch_size], idx[k:k + self.batch_size]

    def _padding(self, pool: tuple | None, n: int) -> tuple:
        """`n` padding samples: copies of the reader's first samples (idx flagged), or zero images."""
        if pool is None:
            return (np.zeros((n, *self.shape), np.uint8), np.full(n, -1, np.int64), np.full(n, -1, np.int64))
        take = np.arange(n) % len(pool[0])
        x, y, idx = (a[take] for a in pool)
        if self.pad == "flag":
            idx = np.where(idx >= 0, -2 - idx, idx)
        return x, y, idx


class _Fatal(Exception):
    """Stops a reader; delivered to the main process as an item, raised there as ShardError."""


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


# --- the public loader ---------------------------------------------------------------------------------

class ShardStream:
    """Batches `(x, y, idx)` streamed from shards; `len(stream)` steps per epoch on every rank.

    See the module docstring for specs, layouts, modes, ordering and error handling.
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


def manifest_stats(manifest: dict, split: str = "train") -> dict:
    """The split's sufficient statistics as tensors: `n` int, `sum_x` float64 [D], `sum_sq` float64 scalar."""
    stats = split_entry(manifest, split)["stats"]
    return {"n": int(stats["n"]), "sum_x": torch.tensor(stats["sum_x"], dtype=torch.float64),
            "sum_sq": torch.tensor(stats["sum_sq"], dtype=torch.float64)}


# --- integrity and whole splits in memory -----------------------------------------------------------------

def verify_shards(directory: str, split: str, num_threads: int = 4) -> list[str]:
    """Messages for the shards of a prepared local split that are missing or whose sha256 differs from the
    manifest (empty when all are intact); the shards are hashed on a few threads."""
    location = manifest_location(os.fspath(directory))
    entry = split_entry(load_manifest(directory), split, location)
    base = _manifest_base(location)

    def check(shard: dict) -> str | None:
        path = f"{base}/{shard['name']}"
        if not os.path.exists(path):
            return f"{path}: missing"
        if sha256_file(path) != shard["sha256"]:
            return f"{path}: sha256 differs from the manifest (corrupt or modified shard)"
        return None

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        return [m for m in pool.map(check, entry["shards"]) if m]


def verify_available(spec) -> bool:
    """Whether `spec` is a local prepared directory (or manifest) whose shards can be hashed at start-up."""
    spec = os.fspath(spec) if not isinstance(spec, (list, tuple)) else ""
    location = manifest_location(spec) if spec else None
    return location is not None and not is_remote(location) and os.path.exists(location) and \
        (os.path.isdir(spec) or spec.endswith(".json"))


def load_split_in_memory(directory: str, split: str, *, verify: bool = True, on_error: str = "raise",
                         num_threads: int = 4) -> tuple[Tensor, Tensor]:
    """All of a prepared split: images uint8 [N, C, H, W] and labels long [N], in index order.

    For validation / test sets and exemplar banks. With `verify`, each shard's sha256 is checked against
    the manifest first. `on_error="raise"`: ValueError naming the shard on any corrupt, missing or duplicate
    sample. `on_error="skip"`: unreadable samples stay zero images with label -1 (rows keep their index)
    and are counted in one warning on logger "bype.data".
    """
    m = load_manifest(directory)
    location = manifest_location(os.fspath(directory))
    entry = split_entry(m, split, location)
    base, shape, n = _manifest_base(location), tuple(m["shape"]), entry["count"]
    block_size = m.get("block_size") if manifest_layout(m) == "blocks" else None
    images = np.zeros((n, *shape), dtype=np.uint8)
    labels = np.full(n, -1, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    bad: list[str] = []

    def fail(kind: str, message: str) -> None:
        raise ValueError(message)

    def load(shard: dict) -> None:
        path = f"{base}/{shard['name']}"
        try:
            if verify and sha256_file(path) != shard["sha256"]:
                raise ValueError(f"{path}: sha256 differs from the manifest (corrupt or modified shard)")
            for x, y, i in shard_chunks(path, expected=shard["count"], shape=shape, block_size=block_size,
                                        report=fail if on_error == "raise" else lambda k, msg: bad.append(msg)):
                if i.min() < 0 or i.max() >= n or seen[i].any() or len(np.unique(i)) != len(i):
                    raise ValueError(f"{path}: idx {int(i[0])}..{int(i[-1])} out of range or duplicate")
                images[i], labels[i], seen[i] = x, y, True
        except (_ShardError, ValueError, OSError) as e:
            if on_error == "raise":
                raise ValueError(str(e) if str(e).startswith(path) else f"{path}: {e}") from e
            bad.append(str(e))

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        list(pool.map(load, entry["shards"]))
    if not seen.all():
        if on_error == "raise":
            raise ValueError(f"{location}: split {split!r} lacks samples, e.g. idx {int(np.flatnonzero(~seen)[0])}")
        log.warning("split %r of %s: %d of %d samples unreadable, kept as zero images with label -1 (%s)",
                    split, location, int((~seen).sum()), n, "; ".join(bad[:3]) or "missing samples")
    return torch.from_numpy(images), torch.from_numpy(labels)
