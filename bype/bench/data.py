"""Data-loading throughput: streamed shards (per worker, end to end) against the in-memory path.

  bype bench data [--n28 20000] [--n64 5000] [--batch-size 100] [--workers 2] [--epochs 2] [--out DIR]

For two image shapes, 28x28 grey (real Fashion-MNIST when installed, else synthetic) and 64x64 RGB
(synthetic smooth images, about as compressible as face crops), it prepares temporary shards with
`bype data prepare` and measures, in samples per second:

- prepare: writing the shards (PNG encoding, one process);
- stream, 1 reader: `ShardStream(num_workers=0)`, i.e. what one DataLoader worker delivers
  (tar reading, PNG decoding, shuffle buffer, collation, float conversion);
- stream, W workers: `ShardStream(num_workers=W)` end to end in the main process, worker start-up
  included (workers start once per epoch);
- memory: indexing a uint8 tensor [N, C, H, W] with a shuffled batch of indices + float conversion,
  the path of data sets held in memory.

Each stream figure is the mean over `--epochs` epochs in exact mode. Prints a table; writes DIR/data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image

FMNIST = "/usr/share/datasets/fashion-mnist"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n28", type=int, default=20000, help="samples of the 28x28 grey set")
    p.add_argument("--n64", type=int, default=5000, help="samples of the 64x64 RGB set")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the end-to-end row")
    p.add_argument("--epochs", type=int, default=2, help="epochs averaged per stream row")
    p.add_argument("--shard-size", type=int, default=2500)
    p.add_argument("--synthetic", action="store_true", help="synthetic 28x28 data even if Fashion-MNIST exists")
    p.add_argument("--out", default="runs/bench/data", help="directory for data.json")


def _smooth_rgb(n: int, size: int, seed: int) -> np.ndarray:
    """Low-frequency colour fields plus mild noise: compresses like natural images, unlike pure noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        out[i] = np.clip(img + rng.integers(-4, 5, img.shape), 0, 255)
    return out


def _make_sets(tmp: str, args) -> list[dict]:
    from bype.data.prepare import prepare

    sets = []
    use_real = os.path.isdir(FMNIST) and not args.synthetic
    if use_real:
        t0 = time.perf_counter()
        prepare("fashion-mnist", FMNIST, f"{tmp}/s28", shard_size=args.shard_size, limit=args.n28,
                splits=["train"], progress=False)
        sets.append({"name": "28x28x1 fashion-mnist", "dir": f"{tmp}/s28", "prepare_s": time.perf_counter() - t0})
    else:
        x = _smooth_rgb(args.n28, 28, 0).mean(-1).astype(np.uint8)
        np.savez(f"{tmp}/s28.npz", x_train=x, y_train=np.zeros(len(x), np.int64))
        t0 = time.perf_counter()
        prepare("npz", f"{tmp}/s28.npz", f"{tmp}/s28", shard_size=args.shard_size, progress=False)
        sets.append({"name": "28x28x1 synthetic", "dir": f"{tmp}/s28", "prepare_s": time.perf_counter() - t0})
    x = _smooth_rgb(args.n64, 64, 1)
    np.savez(f"{tmp}/s64.npz", x_train=x, y_train=np.zeros(len(x), np.int64))
    t0 = time.perf_counter()
    prepare("npz", f"{tmp}/s64.npz", f"{tmp}/s64", shard_size=args.shard_size, progress=False)
    sets.append({"name": "64x64x3 synthetic", "dir": f"{tmp}/s64", "prepare_s": time.perf_counter() - t0})
    return sets


def _time_stream(directory: str, workers: int, args) -> float:
    from bype.data.stream import ShardStream

    s = ShardStream(directory, batch_size=args.batch_size, num_workers=workers, mode="exact",
                    shuffle_buffer=1000, pin_memory=False)
    n, t0 = 0, time.perf_counter()
    for epoch in range(args.epochs):
        for x, _, _ in s.epoch(epoch):
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def _time_memory(directory: str, args) -> float:
    from bype.data.stream import load_split_in_memory

    x, _ = load_split_in_memory(directory, "train")
    g = torch.Generator().manual_seed(0)
    n, t0 = 0, time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=g).split(args.batch_size):
            batch = x[idx].float().div_(255.0)
            n += batch.shape[0]
    return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the loader's workers are the parallelism being measured
    load_before = os.getloadavg()[0]  # other processes on the machine skew every figure: record them
    rows = []
    with tempfile.TemporaryDirectory(prefix="bype-bench-data-") as tmp:
        for s in _make_sets(tmp, args):
            with open(os.path.join(s["dir"], "manifest.json")) as f:
                n = json.load(f)["splits"]["train"]["count"]
            shard_bytes = sum(os.path.getsize(os.path.join(s["dir"], f)) for f in os.listdir(s["dir"])
                              if f.endswith(".tar"))
            rows.append({"data": s["name"], "path": "prepare (1 process)", "samples_per_s": n / s["prepare_s"]})
            rows.append({"data": s["name"], "path": "stream, 1 reader", "samples_per_s": _time_stream(s["dir"], 0, args)})
            rows.append({"data": s["name"], "path": f"stream, {args.workers} workers",
                         "samples_per_s": _time_stream(s["dir"], args.workers, args)})
            rows.append({"data": s["name"], "path": "memory (index + float)", "samples_per_s": _time_memory(s["dir"], args)})
            for r in rows[-4:]:
                r.update(n=n, bytes_per_sample=shard_bytes / n)
    result = {"rows": rows, "batch_size": args.batch_size, "epochs": args.epochs, "workers": args.workers,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "loadavg_1min": [load_before, os.getloadavg()[0]]}
    print(f"{'data':24s} {'path':26s} {'samples/s':>12s} {'us/sample':>10s}")
    for r in rows:
        print(f"{r['data']:24s} {r['path']:26s} {r['samples_per_s']:12,.0f} {1e6 / r['samples_per_s']:10.1f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "data.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"1-min load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="bype bench data")
    add_arguments(_p)
    raise SystemExit(run(_p.parse_args()))
