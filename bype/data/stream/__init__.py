"""Streaming loader over webdataset tar shards with equal steps per rank.

A `ShardStream` yields batches `(x, y, idx)`: `x` float32 [B, C, H, W] in [0, 1] (`epoch`) or uint8 as
stored (`raw_epoch`, for a conversion on the device), `y` long labels, `idx` long global index within
the split (-1 when a shard does not store it). Every batch has exactly `batch_size` samples and every
rank gets exactly `len(stream)` batches per epoch, whatever the shard sizes, so DDP collectives never
wait on a rank that ran out of data.

Shard specs (`spec`)
    A prepared directory (or its `manifest.json`), local paths, brace patterns, several specs joined by
    `::` or given as a list, http(s) URLs, `pipe:` commands; per-shard sample counts from a manifest.

Layouts (`bype.data.records`)
    Block records (many samples per tar member, what `bype data prepare` writes) are read as arrays;
    one-sample records (PNG / JPEG, the webdataset convention) are decoded in the workers. Either way the
    pipeline after reading works on whole arrays: a seeded window of blocks, a seeded buffer of samples
    (`bype.data.shuffle`), batches cut as tensors; workers send groups of batches (about 1 MB) to the main
    process, persistent across epochs; with CUDA the DataLoader pins them.

Modes (`plan`)
    `resample` (default): every reader (rank x DataLoader worker) draws shards with replacement, and the
        epoch is cut at `len = ceil(samples_per_epoch / (world_size * batch_size))` batches.
    `exact`: each sample exactly once per epoch across all ranks, `len = ceil(N / (world_size * batch_size))`;
        a rank's spare slots hold padding in its last batch, with idx `-2 - idx` under `pad="flag"`
        (`is_padding`, `true_index`). `stream.padded` is the number of padding samples this rank received
        last epoch.

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

Modules (imports point one way: loader -> reader -> plan, ring, spec; in_memory -> reader, spec;
verify -> spec; nothing imports the loader)
    `spec`: shard specs, counts and manifest (`resolve_shards`, `manifest_stats`);
    `plan`: exact and resample epoch plans, padding marks (`exact_plan`, `is_padding`, `true_index`);
    `reader`: reading shards in the workers (`shard_chunks`, `_Reader`, `ShardError`, `available_cpus`);
    `ring`: the shared-memory slots from workers to the main process;
    `loader`: `ShardStream`, `to_float`;
    `verify`: sha256 checks of a prepared split (`verify_shards`, `verify_available`);
    `in_memory`: whole splits in memory (`load_split_in_memory`).
"""
from ..manifest import load_manifest
from ..records import decode_sample
from .in_memory import load_split_in_memory
from .loader import ShardStream, to_float
from .plan import exact_plan, is_padding, true_index
from .reader import ShardError, available_cpus, shard_chunks
from .spec import manifest_stats, resolve_shards
from .verify import verify_available, verify_shards

__all__ = ["ShardStream", "ShardError", "load_manifest", "load_split_in_memory", "manifest_stats", "is_padding",
           "true_index", "exact_plan", "verify_shards", "to_float", "decode_sample",
           # also imported from here by bype.data, bype.data.repack and tests
           "available_cpus", "resolve_shards", "shard_chunks", "verify_available"]
