"""Training throughput with 1, 2, ... processes (torchrun DDP or DeepSpeed) and the coreset update's share.

  bype bench scaling [--procs 1,2] [--engine ddp|deepspeed] [--device cpu|cuda] [--epochs 3]
                     [--train-limit 10000] [--batch-size 100] [--every 10] [--threads T] [--config FILE]
                     [--out DIR]
                     [key.sub=value ...]

Each process count is a real `torchrun --standalone ... bype train` run (ByPE-VAE on real Fashion-MNIST,
the coreset updated every epoch so each epoch times one update), read back from its metrics.jsonl. The
first epoch is warm-up and is dropped when there are more. Per process count:

- step samples/s: global batch x steps / time in the training steps (forward, backward, all-reduce, update);
- epoch samples/s: the same over the whole epoch with validation but without the coreset update;
- coreset s: one update (each rank evaluates its S / W share of the samples and the sums are
  all-reduced, docs/CORESET.md; on a CPU each rank also has fewer threads);
- coreset share: update / (every x epoch + update), the fraction of wall time at coreset.every=k.

The cores are split between the processes (OMP_NUM_THREADS = cores / P unless --threads), so 1 process
uses all of them: the comparison is at equal hardware. The figures are only as quiet as the machine:
other processes on the cores slow multi-threaded runs most. `train.batch_size` is the global batch in every run.
Writes DIR/scaling.json and DIR/scaling.md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from bype.bench._report import write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procs", default=None, help="comma-separated process counts (default 1,2 on CPU; "
                   "1,2,4,.. up to the GPU count on CUDA)")
    p.add_argument("--engine", choices=("ddp", "deepspeed"), default="ddp")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is dropped as warm-up)")
    p.add_argument("--train-limit", type=int, default=10000, help="training examples (data.train_limit)")
    p.add_argument("--batch-size", type=int, default=100, help="global batch (train.batch_size)")
    p.add_argument("--every", type=int, default=10, help="coreset.every for the share column")
    p.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / processes)")
    p.add_argument("--config", default=None, help="a bype config to start from (default: the built-in one)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    p.add_argument("--out", default="runs/bench/scaling", help="directory for scaling.json / scaling.md")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")


def _procs(args) -> list[int]:
    if args.procs:
        return [int(p) for p in args.procs.split(",")]
    if args.device == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--device cuda: no CUDA device is visible")
        return [p for p in (1, 2, 4, 8, 16) if p <= n]
    return [1, 2]


def _run(args, nproc: int, work: str) -> dict:
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)  # equal hardware: cores split between ranks
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".cache/torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    name = f"p{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "bype.cli", "train", *(["--config", args.config] if args.config else []),
           f"out_dir={work}", f"name={name}", f"device={args.device}", f"dist.engine={args.engine}",
           f"data.train_limit={args.train_limit}", f"train.batch_size={args.batch_size}",
           f"train.epochs={args.epochs}", "train.max_minutes=null", "train.patience=1000000",
           "coreset.every=1", "eval.at_end=false", "eval.n_samples_grid=4", *args.overrides]
    print(f"[scaling] {nproc} process(es) x {threads} thread(s): {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    with open(os.path.join(work, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    timed = records[1:] if len(records) > 1 else records
    mean = lambda key: sum(r.get(key, 0.0) for r in timed) / len(timed)  # noqa: E731
    samples = mean("steps") * args.batch_size
    step_s, epoch_s, coreset_s = mean("step_seconds"), mean("epoch_seconds"), mean("coreset_seconds")
    train_epoch = epoch_s - coreset_s  # steps + validation, the part every epoch pays
    return {"procs": nproc, "threads_per_proc": threads, "epochs_timed": len(timed),
            "steps_per_epoch": mean("steps"), "global_batch": args.batch_size,
            "step_samples_per_s": samples / step_s, "epoch_samples_per_s": samples / train_epoch,
            "step_seconds": step_s, "epoch_seconds_without_coreset": train_epoch, "coreset_seconds": coreset_s,
            "coreset_steps": mean("coreset_steps"),
            "coreset_share_at_every": coreset_s / (args.every * train_epoch + coreset_s),
            "final_val_loss": records[-1]["val_loss"], "wall_seconds": time.time() - t0}


def table(rows: list[dict], every: int) -> str:
    base = rows[0]["step_samples_per_s"]
    lines = [f"| processes | threads each | step samples/s | speed-up | epoch samples/s | coreset update s "
             f"| coreset share (every {every}) | val loss |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['procs']} | {r['threads_per_proc']} | {r['step_samples_per_s']:.0f} | "
                     f"{r['step_samples_per_s'] / base:.2f}x | {r['epoch_samples_per_s']:.0f} | "
                     f"{r['coreset_seconds']:.2f} | {100 * r['coreset_share_at_every']:.1f}% | "
                     f"{r['final_val_loss']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    procs = _procs(args)
    for p in procs:
        if args.batch_size % p:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by {p} processes")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bype-scaling-") as work:
        for p in procs:
            rows.append(_run(args, p, work))
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    report = {"engine": args.engine, "device": args.device, "train_limit": args.train_limit,
              "epochs": args.epochs, "every": args.every, "config": args.config, "overrides": args.overrides,
              "machine": machine, "rows": rows}
    write_report(args.out, "scaling", report, table(rows, args.every))
    return 0
