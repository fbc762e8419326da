"""Reading shards, in DataLoader workers: one shard's samples as chunks of arrays, and `_Reader`, the
reader of one rank whose workers each read their part of the epoch plan and yield groups of batches.

Block records (many samples per tar member) are read as arrays; one-sample records (PNG / JPEG) are
decoded here. After reading: a seeded window of blocks, a seeded buffer of samples (`bype.data.shuffle`),
batches cut as arrays, sent in groups (about 1 MB) as tensors or through the shared-memory ring.

A shard that cannot be read through, a block or a sample that cannot be decoded, is reported and skipped
(or, under `on_error="raise"`, stops the reader); the reports travel with the items to the main process.
A local shard directory that vanishes stops the reader whatever `on_error` says.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..manifest import is_remote
from ..records import decode_block, decode_sample, record_layout, stack_samples
from ..shuffle import BatchShuffler, concat, shuffle_chunks
from .plan import _rng_seed, exact_plan, resample_segments
from .ring import _SlotRing
from .spec import _shard_basename

_MAX_EMPTY_DRAWS = 64  # resample: consecutive shard draws without a sample before giving up (no hang)


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

    def __init__(self, s):  # s: the ShardStream (the loader module, which this one does not import)
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
        segments = resample_segments(self.urls, self.counts, seed=self.seed, epoch=epoch, rank=self.rank,
                                     worker=worker)
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
