"""The `manifest.json` of a prepared shard directory: names, atomic writes, loading, validation.

Layout of a prepared directory::

    manifest.json                 written last, atomically: the directory is complete when it exists
    train-000000.tar ...          webdataset shards, one per `shard_size` samples, in index order
                                  (records: blocks of `block_size` samples, or one sample each)
    _prepare/config.json          the configuration that produced the shards (resume / --force check)
    _prepare/train-000000.npz     per-shard count, sha256 and exact integer statistics (resume)

Manifest (format version 1)::

    {"format": "bype-shards", "version": 1, "dataset": "fashion-mnist", "config": {...},
     "shape": [C, H, W], "dtype": "uint8", "layout": "blocks", "block_size": 256, "encoding": "raw",
     "labels": [0, ..., 9], "classes": [...] | null,
     "splits": {"train": {"count": 50000,
                          "stats": {"n": 50000, "sum_x": [D floats], "sum_sq": float},
                          "shards": [{"name": "train-000000.tar", "count": 5000, "first_idx": 0,
                                      "sha256": "..."}, ...]}, ...}}

`layout` is "blocks" (`encoding` "raw": uint8 arrays as .npy, `block_size` samples per record) or
"samples" (one record per sample, `encoding` "png" / "jpeg"); a manifest without `layout` (written
before blocks existed) means "samples". `stats` are the sufficient statistics of the coreset data term with x scaled to [0, 1] and flattened in
C, H, W order: `sum_x = sum_n x_n` (per pixel), `sum_sq = sum_n ||x_n||^2`, `n`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from bype.atomic import write_text_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "bype-shards"
VERSION = 1
SPLITS = ("train", "val", "test")
_REQUIRED = ("format", "version", "dataset", "shape", "dtype", "splits")


def manifest_layout(manifest: dict) -> str:
    """The record layout of a manifest's shards: 'blocks' or 'samples' (older manifests: samples)."""
    return manifest.get("layout", "samples")


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def sample_key(idx: int) -> str:
    # No dots: webdataset splits a member name into key and field at the first dot.
    return f"{idx:08d}"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    """Write JSON atomically: readers never see a half-written file."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def is_remote(spec: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", spec)) and not spec.startswith("file:")


def manifest_location(spec: str) -> str | None:
    """Where the manifest of `spec` lives: the directory's own, or the one beside the (first) shard.

    Returns None for `pipe:` commands, whose shard location cannot be inferred.
    """
    if spec.startswith("pipe:"):
        return None
    if spec.startswith("file:"):
        spec = spec[len("file:"):]
    if spec.endswith(".json"):
        return spec
    if not is_remote(spec) and os.path.isdir(spec):
        return os.path.join(spec, MANIFEST_NAME)
    first = spec.split("::")[0]
    parent = first.rsplit("/", 1)[0] if "/" in first else "."
    return f"{parent}/{MANIFEST_NAME}"


def _read_text(location: str) -> str:
    if is_remote(location):
        import webdataset as wds  # http(s) and friends through webdataset's opener

        with wds.gopen(location, "rb") as f:
            return f.read().decode("utf-8")
    with open(location, encoding="utf-8") as f:
        return f.read()


def validate_manifest(m, where: str) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f"{where}: manifest is not a JSON object")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ValueError(f"{where}: manifest lacks key(s) {', '.join(missing)}")
    if m["format"] != FORMAT or m["version"] != VERSION:
        raise ValueError(f"{where}: unsupported manifest format {m['format']!r} version {m['version']!r}")
    if m.get("layout", "samples") not in ("blocks", "samples"):
        raise ValueError(f"{where}: unknown layout {m['layout']!r} (blocks or samples)")
    if m.get("layout") == "blocks" and not (isinstance(m.get("block_size"), int) and m["block_size"] >= 1):
        raise ValueError(f"{where}: layout 'blocks' needs a positive integer block_size")
    if len(m["shape"]) != 3:
        raise ValueError(f"{where}: 'shape' must be [C, H, W], got {m['shape']}")
    for split, entry in m["splits"].items():
        for key in ("count", "stats", "shards"):
            if key not in entry:
                raise ValueError(f"{where}: split {split!r} lacks key {key!r}")
        if sum(s["count"] for s in entry["shards"]) != entry["count"]:
            raise ValueError(f"{where}: split {split!r}: shard counts do not add up to {entry['count']}")
    return m


def load_manifest(spec_or_dir: str) -> dict:
    """The manifest of a prepared directory, a manifest path, or the one beside a shard spec.

    Raises FileNotFoundError / ValueError naming the manifest file when it is missing or malformed.
    """
    location = manifest_location(str(spec_or_dir))
    if location is None:
        raise ValueError(f"{spec_or_dir}: cannot locate a manifest for a pipe: spec; pass its path explicitly")
    try:
        text = _read_text(location)
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no manifest (run `bype data prepare` first)") from None
    except OSError as e:
        raise FileNotFoundError(f"{location}: cannot read manifest ({e})") from e
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{location}: manifest is not valid JSON ({e})") from e
    return validate_manifest(m, location)


def split_entry(manifest: dict, split: str, where: str = "manifest") -> dict:
    try:
        return manifest["splits"][split]
    except KeyError:
        have = ", ".join(sorted(manifest["splits"])) or "none"
        raise KeyError(f"{where}: no split {split!r} (has: {have})") from None
