"""`bype data repack SRC --out DIR`: one-sample-per-record shards -> block shards (fast to stream).

SRC is a prepared directory (any layout; every split, or `--splits`, keeps its samples, labels and
indices) or a shard spec of webdataset shards made by other tools (`DIR/train-{000000..000099}.tar`,
a list joined by `::`; one image member `png` / `jpg` / ... per record, optional `cls` label): those
become split `--split`, samples numbered in reading order (spec order, then tar order), labels -1
where a record has no `cls`. All images must share one shape (the first one's, or the manifest's).

Input shards are decoded in `--workers` processes (one shard per task, in order), and the decode rate
is logged. The output is what `bype data prepare --layout blocks` writes: shards of `--shard-size`
samples, `--block-size` samples per record, and a manifest with exact statistics. A damaged record
stops the command with one line naming its shard and key (a conversion should not lose data silently).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import get_context

import numpy as np
from tqdm import tqdm

from .manifest import SPLITS, load_manifest, manifest_layout, manifest_location, shard_name, split_entry, \
    write_json_atomic
from .prepare import add_layout_arguments, build_manifest, claim_output, write_shard
from .records import DEFAULT_BLOCK_SIZE
from .stream.reader import _ShardError, available_cpus, shard_chunks
from .stream.spec import resolve_shards
from .shuffle import concat, rechunk


class RepackError(ValueError):
    pass


def _decode_shard(task: tuple) -> tuple:
    """Worker: every sample of one shard as one chunk (x, y, idx); RepackError naming what is broken."""
    url, shape, block_size = task

    def fail(kind: str, message: str) -> None:
        raise RepackError(message)
    try:
        chunks = list(shard_chunks(url, shape=shape, block_size=block_size, report=fail))
    except _ShardError as e:
        raise RepackError(str(e)) from None
    if not chunks:
        return None
    if len({c[0].shape[1:] for c in chunks}) > 1:
        raise RepackError(f"{url}: images of different shapes in one shard")
    return concat(chunks)


def _inputs(src: str, split_arg: str, splits_arg) -> tuple[dict, dict | None]:
    """{split: shard urls} and the source manifest (None for foreign shards)."""
    location = manifest_location(src)
    if os.path.isdir(src) or src.endswith(".json"):
        m = load_manifest(src)
        wanted = splits_arg or [s for s in SPLITS if s in m["splits"]]
        return {s: resolve_shards(src, s, m)[0] for s in wanted if split_entry(m, s, location)}, m
    urls, _, _ = resolve_shards(src, split_arg, manifest={"splits": {}})
    return {split_arg: urls}, None


def repack(src: str, out: str, *, split: str = "train", splits=None, shard_size: int = 5000,
           block_size: int = DEFAULT_BLOCK_SIZE, workers: int = 2, force: bool = False, progress: bool = True,
           log=print) -> dict:
    if shard_size < 1 or block_size < 1:
        raise ValueError(f"need shard_size >= 1 and block_size >= 1, got {shard_size}, {block_size}")
    inputs, source = _inputs(src, split, splits)
    if not any(inputs.values()):
        raise FileNotFoundError(f"{src}: no shards found")
    shape = tuple(source["shape"]) if source else None
    in_block = source.get("block_size") if source and manifest_layout(source) == "blocks" else None
    config = {"format": "bype-shards", "dataset": source["dataset"] if source else "repack",
              "src": src if "://" in src or src.startswith("pipe:") else os.path.abspath(src),
              "shard_size": shard_size, "splits": list(inputs), "repacked": True,
              "layout": "blocks", "block_size": block_size, "encoding": "raw"}
    os.makedirs(out, exist_ok=True)
    claim_output(out, config, force)
    workers = max(1, min(workers, available_cpus()))
    records, plan, sizes, t0, total = {}, [], {}, time.perf_counter(), 0
    with get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool, \
            tqdm(unit="img", desc="repack", disable=not progress) as bar:
        for s, urls in inputs.items():
            decoded = pool.imap(_decode_shard, [(u, shape, in_block) for u in urls])
            start = 0

            def numbered(chunks):  # foreign shards: number samples in reading order; fix the shape
                nonlocal shape, start
                for chunk in chunks:
                    if chunk is None:
                        continue
                    x, y, idx = chunk
                    if shape is None:
                        shape = tuple(x.shape[1:])
                    elif tuple(x.shape[1:]) != shape:
                        raise RepackError(f"{src}: images of shape {list(x.shape[1:])} after {start} samples of "
                                          f"shape {list(shape)}")
                    if source is None:
                        idx = np.arange(start, start + len(x), dtype=np.int64)
                    start += len(x)
                    yield x, y, idx
            for k, chunk in enumerate(rechunk(numbered(decoded), shard_size)):
                name = shard_name(s, k)
                records[name] = write_shard(out, name, [chunk], "blocks", block_size, bar)
                plan.append((s, k, int(records[name]["first_idx"]), int(records[name]["first_idx"] + records[name]["count"])))
            sizes[s] = start
            total += start
    seconds = time.perf_counter() - t0
    classes = source.get("classes") if source else None
    manifest = build_manifest(config["dataset"], config, shape, classes, list(inputs), sizes, plan, records)
    write_json_atomic(os.path.join(out, "manifest.json"), manifest)
    log(f"repacked {total} samples in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} samples/s, "
        f"{workers} decoding worker(s))")
    return {"manifest": manifest, "samples": total, "seconds": seconds, "workers": workers}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="prepared directory, or a shard spec (pattern / list joined by ::)")
    parser.add_argument("--out", required=True, help="output directory for block shards and manifest.json")
    parser.add_argument("--split", default="train", help="split name of a shard spec (default train)")
    parser.add_argument("--splits", help="prepared directory: comma-separated subset of its splits")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per output shard (default 5000)")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="decoding processes (default: the CPU cores available)")
    parser.add_argument("--force", action="store_true", help="overwrite an output prepared differently")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_layout_arguments(parser, blocks_only=True)


def run(args: argparse.Namespace) -> int:
    try:
        summary = repack(args.src, args.out, split=args.split, splits=args.splits.split(",") if args.splits else None,
                         shard_size=args.shard_size, block_size=args.block_size, workers=args.workers,
                         force=args.force, progress=not args.no_progress)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"bype data repack: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    m = summary["manifest"]
    counts = ", ".join(f"{s} {e['count']}" for s, e in m["splits"].items())
    print(f"{args.out}: {m['shape']} in blocks of {m['block_size']} ({counts})")
    return 0

