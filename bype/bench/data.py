"""Data-loading throughput per record layout and worker count, beside the training step's own rate.

  bype bench data [--n28 20000] [--n64 5000] [--workers 0,1,2] [--epochs 2] [--no-train] [--out DIR]

Two image shapes, 28x28 grey (real Fashion-MNIST when installed, else synthetic) and 64x64 RGB
(synthetic smooth images, about as compressible as face crops), written as temporary shards in each
layout: `blocks` (raw uint8, `--block-size` samples per record: what `bype data prepare` writes),
`png` (one PNG per record, `prepare --layout samples`) and, for 64x64, `jpeg` (one JPEG per record, as
other tools write; decoded in the workers). Measured, in samples per second:

- prepare: writing the shards (one process); for jpeg, `bype data repack` into blocks (decoding in
  worker processes);
- stream, W workers: `ShardStream` in exact mode as the trainer reads it (`bype.data.device_batches`:
  uint8 batches converted to float on the device), one warm-up batch (worker start-up) then `--epochs`
  timed epochs; W = 0 is one reader in the main process, i.e. what one worker delivers;
- memory: the in-memory loader (index a uint8 tensor with a shuffled batch) on the same device path;
- train step: the Gaussian-prior VAE step (batch `--batch-size`, `torch` threads `--threads`) fed from
  memory and from block shards with 1 worker, alternated `--train-epochs` times on one Trainer: the
  step's consumption rate and the shards / memory ratio of the step time. On a GPU the step runs
  there (device auto).

Prints a table; writes DIR/data.json and DIR/data.md.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from bype.bench._report import write_report
from bype.device_sync import synchronize as _sync

FMNIST = "/usr/share/datasets/fashion-mnist"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n28", type=int, default=20000, help="samples of the 28x28 grey set")
    p.add_argument("--n64", type=int, default=5000, help="samples of the 64x64 RGB set")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per stream row")
    p.add_argument("--shard-size", type=int, default=2500)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--layouts", default="blocks,png,jpeg", help="comma-separated subset of blocks,png,jpeg")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training-step rows")
    p.add_argument("--train-epochs", type=int, default=3, help="memory / shards alternations of the step rows")
    p.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    p.add_argument("--synthetic", action="store_true", help="synthetic 28x28 data even if Fashion-MNIST exists")
    p.add_argument("--out", default="runs/bench/data", help="directory for data.json / data.md")


def _smooth_rgb(n: int, size: int, seed: int) -> np.ndarray:
    """Low-frequency colour fields plus mild noise: compresses like natural images, unlike pure noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        out[i] = np.clip(img + rng.integers(-4, 5, img.shape), 0, 255)
    return out


def _write_jpeg_shards(x: np.ndarray, pattern: str, shard_size: int) -> list[str]:
    """One JPEG (quality 95) per record, the webdataset convention of other tools: no manifest."""
    import webdataset as wds

    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i, img in enumerate(x):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": b"0"})
    folder = os.path.dirname(pattern)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _make_sets(tmp: str, args, layouts: list[str]) -> list[dict]:
    """Shard directories per (shape, layout): name, dir, layout, n, prepare rate."""
    from bype.data.prepare import prepare
    from bype.data.repack import repack

    n28, n64 = args.n28, args.n64
    if os.path.isdir(FMNIST) and not args.synthetic:
        name28, src28, kind28 = "28x28x1 fashion-mnist", FMNIST, "fashion-mnist"
    else:
        x = _smooth_rgb(n28, 28, 0).mean(-1).astype(np.uint8)
        np.savez(f"{tmp}/s28.npz", x_train=x, y_train=np.zeros(n28, np.int64), x_val=x[:1000], x_test=x[:1000])
        name28, src28, kind28 = "28x28x1 synthetic", f"{tmp}/s28.npz", "npz"
    x64 = _smooth_rgb(n64, 64, 1)
    np.savez(f"{tmp}/s64.npz", x_train=x64, y_train=np.zeros(n64, np.int64), x_val=x64[:500], x_test=x64[:500])
    sets = []
    for name, src, kind, n in ((name28, src28, kind28, n28), ("64x64x3 synthetic", f"{tmp}/s64.npz", "npz", n64)):
        for layout in layouts:
            d = f"{tmp}/{kind}-{n}-{layout}"
            if layout == "jpeg":
                if "64x64" not in name:
                    continue
                os.makedirs(f"{tmp}/jpeg")
                urls = _write_jpeg_shards(x64, f"{tmp}/jpeg/train-%06d.tar", args.shard_size)
                summary = repack("::".join(urls), d, shard_size=args.shard_size, block_size=args.block_size,
                                 workers=max(int(w) for w in args.workers.split(",")), progress=False, log=lambda m: None)
                sets.append({"data": name, "layout": "jpeg", "spec": "::".join(urls), "n": n,
                             "prepare": ("repack (decode)", summary["samples"] / summary["seconds"]), "blocks_dir": d})
                continue
            # The block set also carries val / test: the training-step rows start a Trainer on it.
            splits = ["train", "val", "test"] if layout == "blocks" else ["train"]
            summary, seconds = _timed(lambda: prepare(kind, src, d, shard_size=args.shard_size, limit=n, splits=splits,
                                                      layout="blocks" if layout == "blocks" else "samples",
                                                      block_size=args.block_size, progress=False))
            total = sum(e["count"] for e in summary["manifest"]["splits"].values())
            sets.append({"data": name, "layout": layout, "spec": d, "n": n, "dir": d,
                         "prepare": ("prepare", total / seconds)})
    return sets


def _time_stream(spec: str, n: int, workers: int, args, device, manifest_free: bool = False) -> float:
    """Samples/s of `args.epochs` epochs as the trainer reads them; foreign shards (no manifest, so no
    per-shard counts) in resample mode over the same number of samples."""
    from bype.data import device_batches
    from bype.data.stream import ShardStream

    s = ShardStream(spec, batch_size=args.batch_size, num_workers=workers, shuffle_buffer=5000,
                    mode="resample" if manifest_free else "exact", samples_per_epoch=n if manifest_free else None)
    next(iter(device_batches(s, 0, device)))  # worker start-up, once per stream
    count, t0 = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for x, _, _ in device_batches(s, epoch, device):
            count += x.shape[0]
    _sync(device)
    return count / (time.perf_counter() - t0)


def _time_memory(directory: str, args, device) -> float:
    from bype.data import device_batches
    from bype.data.memory import MemoryLoader, Split
    from bype.data.stream import load_split_in_memory

    loader = MemoryLoader(Split(*load_split_in_memory(directory, "train")), args.batch_size)
    count, t0 = 0, time.perf_counter()
    for epoch in range(args.epochs):
        for x, _, _ in device_batches(loader, epoch, device):
            count += x.shape[0]
    _sync(device)
    return count / (time.perf_counter() - t0)


def _train_rows(directory: str, name: str, args, tmp: str) -> list[dict]:
    """The Gaussian-prior step fed from memory and from shards (1 worker), alternated on one Trainer."""
    from bype.config import load_config
    from bype.data.memory import MemoryLoader
    from bype.train.loop import Trainer

    grey = "28x28" in name
    cfg = load_config(None, [
        f"out_dir={tmp}/runs", f"name=step-{name.split()[0]}", "prior.kind=gaussian", "data.source=shards",
        f"data.shards={directory}", f"data.dataset={'fashion-mnist' if grey else 'celeba'}",
        f"model.likelihood={'bernoulli' if grey else 'logistic'}", "data.num_workers=1", "data.stream.mode=exact",
        f"train.batch_size={args.batch_size}", "eval.at_end=false", "train.log_every=1000000"])
    torch.set_num_threads(args.threads)
    trainer = Trainer(cfg)
    stream = trainer.data.train_loader
    memory = MemoryLoader(trainer.data.train_split(), args.batch_size, cfg.seed)
    times = {"memory": [], "shards": []}
    trainer.data.train_loader = memory
    trainer.train_epoch(1)  # warm-up: allocator, kernels, the stream's worker start-up below
    next(iter(stream.raw_epoch(0)))
    for k in range(args.train_epochs):
        for label, loader in (("memory", memory), ("shards", stream)) if k % 2 == 0 else (
                ("shards", stream), ("memory", memory)):
            trainer.data.train_loader = loader
            r = trainer.train_epoch(2 + k)
            times[label].append(r["step_seconds"] / r["steps"])
    trainer.metrics.close()
    step = {k: statistics.median(v) for k, v in times.items()}
    where = f"{trainer.ctx.device}, {args.threads} thread(s)"
    return [{"data": name, "layout": "-", "path": f"train step from memory ({where})",
             "samples_per_s": args.batch_size / step["memory"], "step_ms": 1e3 * step["memory"]},
            {"data": name, "layout": "blocks", "path": f"train step from shards, 1 worker ({where})",
             "samples_per_s": args.batch_size / step["shards"], "step_ms": 1e3 * step["shards"],
             "shards_over_memory": step["shards"] / step["memory"]}]


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the loader's workers are the parallelism being measured
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = [int(w) for w in args.workers.split(",")]
    layouts = [layout for layout in args.layouts.split(",") if layout]
    load_before = os.getloadavg()[0]  # other processes on the machine skew every figure: record them
    rows = []
    with tempfile.TemporaryDirectory(prefix="bype-bench-data-") as tmp:
        sets = _make_sets(tmp, args, layouts)
        for s in sets:
            label, rate = s["prepare"]
            rows.append({"data": s["data"], "layout": s["layout"], "path": label, "samples_per_s": rate})
            for w in workers:
                rows.append({"data": s["data"], "layout": s["layout"], "path": f"stream, {w} workers",
                             "samples_per_s": _time_stream(s["spec"], s["n"], w, args, device, s["layout"] == "jpeg")})
                print(f"{s['data']:22s} {s['layout']:7s} {rows[-1]['path']:18s} {rows[-1]['samples_per_s']:12,.0f}",
                      flush=True)
        for s in sets:
            if s["layout"] == "blocks":
                rows.append({"data": s["data"], "layout": "-", "path": "memory (index + float)",
                             "samples_per_s": _time_memory(s["dir"], args, device)})
                if not args.no_train:
                    rows.extend(_train_rows(s["dir"], s["data"], args, tmp))
    result = {"rows": rows, "batch_size": args.batch_size, "epochs": args.epochs, "workers": workers,
              "device": device, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
              "loadavg_1min": [load_before, os.getloadavg()[0]]}
    lines = ["| data | layout | path | samples/s | note |", "|---|---|---|---:|---|"]
    for r in rows:
        note = f"step {r['step_ms']:.2f} ms" if "step_ms" in r else ""
        if "shards_over_memory" in r:
            note += f"; shards / memory {r['shards_over_memory']:.3f}x"
        lines.append(f"| {r['data']} | {r['layout']} | {r['path']} | {r['samples_per_s']:,.0f} | {note} |")
    lines.append(f"\n{os.cpu_count()} CPUs ({result['machine']}), device {result['gpu'] or device}; "
                 f"1-min load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    write_report(args.out, "data", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="bype bench data")
    add_arguments(_p)
    raise SystemExit(run(_p.parse_args()))
