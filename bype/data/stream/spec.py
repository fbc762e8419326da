"""Shard specs: which shards a spec names, their sample counts, and the manifest they come with.

A spec is a prepared directory (or its `manifest.json`); local paths; brace patterns
(`data/train-{000000..000007}.tar`); several specs joined by `::` or given as a list; http(s) URLs;
`pipe:` commands (`pipe:aws s3 cp s3://bucket/train-000000.tar -`). All are read with webdataset.
Per-shard sample counts come from the manifest: the directory's own, the `manifest.json` beside the
first shard, or the one passed as `manifest=`. `manifest_stats` gives a split's statistics as tensors.
"""
from __future__ import annotations

import os

import torch
import webdataset as wds

from ..manifest import load_manifest, manifest_location, split_entry


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


def manifest_stats(manifest: dict, split: str = "train") -> dict:
    """The split's sufficient statistics as tensors: `n` int, `sum_x` float64 [D], `sum_sq` float64 scalar."""
    stats = split_entry(manifest, split)["stats"]
    return {"n": int(stats["n"]), "sum_x": torch.tensor(stats["sum_x"], dtype=torch.float64),
            "sum_sq": torch.tensor(stats["sum_sq"], dtype=torch.float64)}
