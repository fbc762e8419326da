"""`bype data prepare DATASET --src PATH --out DIR`: convert a data set into webdataset shards.

Writes `{split}-{000000..}.tar` and `manifest.json` (see `bype.data.manifest`). Records (`--layout`):
`blocks` (default) hold `--block-size` samples each as raw uint8 arrays (`KEY.x.npy`, `KEY.cls.npy`,
`KEY.idx.npy`, KEY = the first sample's index; see `bype.data.records`); `samples` hold one sample each
(`KEY.png` lossless image, `KEY.cls` label, `KEY.idx` global index within its split, as decimal text).

- Resumable: shard k of a split always holds samples [k * shard_size, (k + 1) * shard_size), so a
  rerun keeps every shard whose sha256 matches its record in `_prepare/` and rewrites only the others
  (missing, truncated, corrupt). A shard is written under a temporary name and renamed when complete.
- Safe: an output directory prepared with a different data set or configuration is never overwritten
  unless `force=True` (`--force`).
- Deterministic: fixed tar metadata and array / PNG encoding make the same input give byte-identical shards.
- One writer per output directory at a time.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tarfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import formats
from .manifest import (FORMAT, MANIFEST_NAME, SPLITS, VERSION, sample_key, sha256_file, shard_name,
                       write_json_atomic)
from .records import DEFAULT_BLOCK_SIZE, LAYOUTS, encode_block
from .shuffle import rechunk

DATASETS = ("mnist", "fashion-mnist", "cifar10", "celeba", "imagefolder", "npz")
DEFAULT_SRC = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
STATE_DIR = "_prepare"
_SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
_TMP_RE = re.compile(r"\.tmp-\d+(\.npz)?$")


def open_dataset(dataset: str, src: str, *, size=None, crop=None, channels=3) -> formats.RawDataset:
    if dataset in ("mnist", "fashion-mnist"):
        return formats.read_idx_dataset(src)
    if dataset == "cifar10":
        return formats.read_cifar10(src)
    if dataset == "celeba":
        return formats.read_celeba(src, size=size or 64, crop=148 if crop is None else crop)
    if dataset == "imagefolder":
        return formats.read_imagefolder(src, size=size, channels=channels, crop=crop)
    if dataset == "npz":
        return formats.read_npz(src)
    raise ValueError(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")


def _config(dataset, src, shard_size, splits, limit, size, crop, channels, layout, block_size) -> dict:
    """What determines the shards' content; a different config means a different output."""
    options = {}
    if dataset == "celeba":
        options = {"size": size or 64, "crop": 148 if crop is None else crop}
    elif dataset == "imagefolder":
        options = {"size": size, "crop": crop, "channels": channels}
    return {"format": FORMAT, "version": VERSION, "dataset": dataset, "src": os.path.abspath(src),
            "shard_size": shard_size, "splits": list(splits), "limit": limit, "options": options,
            **_layout_fields(layout, block_size)}


def _layout_fields(layout: str, block_size: int) -> dict:
    if layout == "blocks":
        return {"layout": "blocks", "block_size": block_size, "encoding": "raw"}
    return {"layout": "samples", "encoding": "png"}


# --- output directory state ------------------------------------------------------------------------

def _existing_config(out: str) -> dict | None:
    for path, key in ((os.path.join(out, STATE_DIR, "config.json"), None), (os.path.join(out, MANIFEST_NAME), "config")):
        if os.path.exists(path):
            try:
                with open(path) as f:
                    obj = json.load(f)
                return obj[key] if key else obj
            except (ValueError, KeyError, TypeError):
                return {"unreadable": path}
    return None


def _clear(out: str) -> None:
    """Remove what a previous prepare wrote (and only that)."""
    for name in os.listdir(out):
        if name == MANIFEST_NAME or _SHARD_RE.match(name) or _TMP_RE.search(name):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)


def claim_output(out: str, config: dict, force: bool) -> None:
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    existing = _existing_config(out)
    stray = [n for n in os.listdir(out) if _SHARD_RE.match(n)]
    if existing is not None and existing != config:
        if not force:
            differs = sorted(k for k in set(config) | set(existing) if config.get(k) != existing.get(k))
            raise FileExistsError(f"{out}: already holds shards prepared with a different configuration "
                                  f"(differs in: {', '.join(differs)}); pass --force to overwrite")
        _clear(out)
    elif existing is None and stray:
        if not force:
            raise FileExistsError(f"{out}: holds shards ({stray[0]}, ...) without bype metadata; "
                                  f"pass --force to overwrite")
        _clear(out)
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    for folder in (out, os.path.join(out, STATE_DIR)):  # partial files of an interrupted run
        for name in os.listdir(folder):
            if _TMP_RE.search(name):
                os.remove(os.path.join(folder, name))
    write_json_atomic(os.path.join(out, STATE_DIR, "config.json"), config)


# --- one shard ---------------------------------------------------------------------------------------

def _record_path(out: str, name: str) -> str:
    return os.path.join(out, STATE_DIR, name.replace(".tar", ".npz"))


def _load_record(out: str, name: str, count: int) -> dict | None:
    """The shard's record if the shard on disk is complete and intact (sha256 verified), else None."""
    path, rec_path = os.path.join(out, name), _record_path(out, name)
    if not (os.path.exists(path) and os.path.exists(rec_path)):
        return None
    try:
        with np.load(rec_path) as z:
            rec = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    if int(rec["count"]) != count or str(rec["sha256"]) != sha256_file(path):
        return None
    return rec


def _encode_png(x: np.ndarray) -> bytes:
    img = Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible shards
    tar.addfile(info, io.BytesIO(data))


def source_chunks(source: formats.Source, start: int, stop: int, size: int):
    """Chunks (x, y, idx) of samples [start, stop) of a source, `size` samples at a time, shapes checked."""
    shape = source.shape
    for a in range(start, stop, size):
        xs, ys = [], []
        for i in range(a, min(a + size, stop)):
            x, y = source.get(i)
            if x.shape != shape or x.dtype != np.uint8:
                raise ValueError(f"sample {i}: image {x.dtype} {list(x.shape)}, expected uint8 {list(shape)}")
            xs.append(x), ys.append(y)
        yield np.stack(xs), np.array(ys, dtype=np.int64), np.arange(a, a + len(xs), dtype=np.int64)


def write_shard(out: str, name: str, chunks, layout: str, block_size: int, bar) -> dict:
    """Write one shard from chunks (x, y, idx) in the given layout, atomically; returns its record
    (count, first index, sha256, exact integer pixel sums, labels), also saved under `_prepare/`."""
    sum_x, sum_sq, labels, count, first = None, 0, set(), 0, None
    path = os.path.join(out, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for x, y, idx in rechunk(chunks, block_size if layout == "blocks" else None):
                if layout == "blocks":
                    for field, data in encode_block(x, y, idx).items():
                        _add_member(tar, f"{sample_key(int(idx[0]))}.{field}", data)
                else:
                    for xi, yi, i in zip(x, y, idx):
                        key = sample_key(int(i))
                        _add_member(tar, f"{key}.png", _encode_png(xi))
                        _add_member(tar, f"{key}.cls", str(int(yi)).encode())
                        _add_member(tar, f"{key}.idx", str(int(i)).encode())
                v = x.reshape(len(x), -1).astype(np.int64)  # exact integer sums; scaled once at the end
                sum_x = v.sum(0) if sum_x is None else sum_x + v.sum(0)
                sum_sq += int(np.einsum("ij,ij->", v, v))
                labels.update(int(c) for c in np.unique(y))
                first = int(idx[0]) if first is None else first
                count += len(x)
                bar.update(len(x))
        f.flush()
        os.fsync(f.fileno())
    rec = {"count": np.int64(count), "first_idx": np.int64(first or 0), "sha256": np.str_(sha256_file(tmp)),
           "sum_x": sum_x, "sum_sq": np.int64(sum_sq), "labels": np.array(sorted(labels), dtype=np.int64)}
    os.replace(tmp, path)
    rec_tmp = _record_path(out, name) + f".tmp-{os.getpid()}.npz"
    np.savez(rec_tmp, **rec)
    os.replace(rec_tmp, _record_path(out, name))
    return rec


# --- the whole data set --------------------------------------------------------------------------------

def prepare(dataset: str, src: str | None, out: str, *, shard_size: int = 5000, splits=None, limit: int | None = None,
            size: int | None = None, crop: int | None = None, channels: int = 3, layout: str = "blocks",
            block_size: int = DEFAULT_BLOCK_SIZE, force: bool = False, progress: bool = True) -> dict:
    """Write (or complete) the shards and manifest of `dataset` under `out`.

    Returns {"manifest": dict, "written": [shard names], "kept": [shard names]}.
    """
    src = src or DEFAULT_SRC.get(dataset)
    if src is None:
        raise ValueError(f"{dataset}: --src is required (no default location)")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: source of {dataset} not found")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    raw = open_dataset(dataset, src, size=size, crop=crop, channels=channels)
    splits = [s for s in SPLITS if s in raw.splits] if splits is None else list(splits)
    for s in splits:
        if s not in raw.splits:
            raise KeyError(f"{src}: {dataset} has no split {s!r} (has: {', '.join(raw.splits)})")
    config = _config(dataset, src, shard_size, splits, limit, size, crop, channels, layout, block_size)
    os.makedirs(out, exist_ok=True)
    claim_output(out, config, force)

    sizes = {s: len(raw.splits[s]) if limit is None else min(limit, len(raw.splits[s])) for s in splits}
    plan = [(s, k, k * shard_size, min((k + 1) * shard_size, sizes[s]))
            for s in splits for k in range((sizes[s] + shard_size - 1) // shard_size)]
    records = {shard_name(s, k): _load_record(out, shard_name(s, k), stop - start) for s, k, start, stop in plan}
    todo = [name for name, rec in records.items() if rec is None]
    if todo and os.path.exists(os.path.join(out, MANIFEST_NAME)):
        os.remove(os.path.join(out, MANIFEST_NAME))  # the directory is incomplete until the end

    with tqdm(total=sum(sizes.values()), unit="img", desc=f"prepare {dataset}", disable=not progress) as bar:
        for s, k, start, stop in plan:
            name = shard_name(s, k)
            if records[name] is None:
                chunks = source_chunks(raw.splits[s], start, stop, block_size if layout == "blocks" else 64)
                records[name] = write_shard(out, name, chunks, layout, block_size, bar)
            else:
                bar.update(stop - start)

    manifest = build_manifest(dataset, config, raw.shape, raw.classes, splits, sizes, plan, records)
    write_json_atomic(os.path.join(out, MANIFEST_NAME), manifest)
    return {"manifest": manifest, "written": todo, "kept": [n for n in records if n not in todo]}


def build_manifest(dataset, config, shape, classes, splits, sizes, plan, records) -> dict:
    """The manifest of finished shards: `plan` [(split, k, start, stop)], `records` by shard name."""
    entries, labels = {}, set()
    d = int(np.prod(shape))
    for s in splits:
        shards = [(shard_name(s, k), records[shard_name(s, k)]) for s2, k, _, _ in plan if s2 == s]
        sum_x = np.zeros(d, dtype=np.int64)
        sum_sq = 0  # Python int: cannot overflow on any data set size
        for _, rec in shards:
            sum_x += rec["sum_x"]
            sum_sq += int(rec["sum_sq"])
            labels.update(int(v) for v in rec["labels"])
        entries[s] = {
            "count": sizes[s],
            "stats": {"n": sizes[s], "sum_x": (sum_x / 255.0).tolist(), "sum_sq": sum_sq / 255.0 ** 2},
            "shards": [{"name": n, "count": int(r["count"]), "first_idx": int(r["first_idx"]),
                        "sha256": str(r["sha256"])} for n, r in shards],
        }
    return {"format": FORMAT, "version": VERSION, "dataset": dataset, "config": config,
            "shape": list(shape), "dtype": "uint8", **_layout_fields(config["layout"], config.get("block_size")),
            "labels": sorted(labels), "classes": classes, "splits": entries}


# --- command line ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--src", help="raw data (default for fashion-mnist: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    parser.add_argument("--splits", help="comma-separated subset of train,val,test (default: all)")
    parser.add_argument("--limit", type=int, help="keep only the first N samples of each split")
    parser.add_argument("--size", type=int, help="celeba / imagefolder: resize to SIZE x SIZE (celeba: 64)")
    parser.add_argument("--crop", type=int, help="celeba / imagefolder: centre square side before resizing "
                        "(celeba: 148; 0 = the shorter side)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="imagefolder: 1 grey, 3 RGB")
    add_layout_arguments(parser)
    parser.add_argument("--force", action="store_true", help="overwrite an output prepared differently")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_layout_arguments(parser: argparse.ArgumentParser, blocks_only: bool = False) -> None:
    if not blocks_only:
        parser.add_argument("--layout", choices=LAYOUTS, default="blocks",
                            help="blocks: BLOCK_SIZE raw uint8 samples per tar record (fast to stream; default); "
                            "samples: one PNG per sample (the webdataset convention)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"samples per block record (default {DEFAULT_BLOCK_SIZE})")


def run(args: argparse.Namespace) -> int:
    try:
        summary = prepare(args.dataset, args.src, args.out, shard_size=args.shard_size,
                          splits=args.splits.split(",") if args.splits else None, limit=args.limit,
                          size=args.size, crop=args.crop, channels=args.channels, layout=args.layout,
                          block_size=args.block_size, force=args.force,
                          progress=not args.no_progress)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"bype data prepare: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    m = summary["manifest"]
    counts = ", ".join(f"{s} {e['count']}" for s, e in m["splits"].items())
    print(f"{args.out}: {m['dataset']} {m['shape']} ({counts}); "
          f"{len(summary['written'])} shard(s) written, {len(summary['kept'])} kept")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="bype data prepare")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
