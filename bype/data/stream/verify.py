"""Integrity at start-up: which shards of a prepared local split are missing or differ from the
manifest's sha256, and whether a spec is such a split at all."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..manifest import is_remote, load_manifest, manifest_location, sha256_file, split_entry
from .spec import _manifest_base


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
