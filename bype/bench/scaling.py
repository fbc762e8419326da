"""Training throughput with 1, 2, ... processes (torchrun DDP or DeepSpeed): step, coreset update and
evaluation times, per-rank FLOPs of a step, and the cost model's prediction beside each measurement.

  bype bench scaling [--procs 1,2] [--engine ddp|deepspeed] [--device cpu|cuda] [--epochs 3]
                     [--train-limit 10000] [--batch-size 100] [--every 10] [--threads T] [--config FILE]
                     [--before-after] [--repeats R] [--out DIR]
                     [key.sub=value ...]

Each process count is a real `torchrun --standalone ... bype train` run (ByPE-VAE on real Fashion-MNIST,
the coreset updated every epoch so each epoch times one update), read back from its metrics.jsonl
(`steps`, `step_seconds`, `coreset_seconds`, `epoch_seconds`). The first epoch is warm-up and is dropped
when there are more. `--before-after` adds, for every count above 1, a run with the prior's encodings
replicated on every rank (`dist.shard_prior=false`, the design before sharding); `--repeats` alternates the
whole sequence R times so that both see the same load. Per run:

- step ms: time in the training steps (forward, backward, all-reduce, update) / steps;
- coreset s: one update; eval s: the rest of an epoch (validation, the loss all-reduce);
- per-rank GFLOP: one step on rank 0, counted by FlopCounterMode in a separate short torchrun job
  (`bype.bench._scaling_worker`, DDP) that also measures this machine's matmul rate, time per operator,
  memory bandwidth and gloo all-reduce time: the inputs of the cost model (bype.bench.perf.cost_model),
  whose predicted step time is printed beside the measured one.
- coreset s: one update (each rank evaluates its S / W share of the samples and the sums are
  all-reduced, docs/CORESET.md; on a CPU each rank also has fewer threads).

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
    p.add_argument("--before-after", action="store_true",
                   help="also run every count above 1 with the prior's encodings replicated (dist.shard_prior=false)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the whole sequence of runs this many times")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting jobs and the cost model")
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


def _variants(args) -> list[tuple[int, bool]]:
    """(processes, sharded prior) in run order; one process has nothing to shard."""
    out = []
    for p in _procs(args):
        if p > 1 and args.before_after:
            out.append((p, False))
        out.append((p, True))
    return out


def _label(nproc: int, sharded: bool) -> str:
    return f"p{nproc}" if nproc == 1 else f"p{nproc}-{'sharded' if sharded else 'replicated'}"


def _launch(args, nproc: int, module_args: list[str], timeout: float) -> None:
    threads = _threads(args, nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".cache/torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", *module_args]
    print(f"[scaling] {nproc} process(es) x {threads} thread(s): {' '.join(cmd[6:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")


def _threads(args, nproc: int) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // nproc)  # equal hardware: cores split between ranks


def _common(args, work: str, name: str, engine: str, sharded: bool) -> list[str]:
    return [*(["--config", args.config] if args.config else []), f"out_dir={work}", f"name={name}",
            f"device={args.device}", f"dist.engine={engine}", f"dist.shard_prior={str(sharded).lower()}",
            f"data.train_limit={args.train_limit}", f"train.batch_size={args.batch_size}",
            "train.max_minutes=null", "train.patience=1000000", "coreset.every=1", "eval.at_end=false",
            "eval.n_samples_grid=4", *args.overrides]


def _time_run(args, nproc: int, sharded: bool, work: str, name: str) -> dict:
    t0 = time.time()
    _launch(args, nproc, ["bype.cli", "train", *_common(args, work, name, args.engine, sharded),
                          f"train.epochs={args.epochs}"], args.timeout)
    with open(os.path.join(work, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    timed = records[1:] if len(records) > 1 else records
    mean = lambda key: sum(r.get(key, 0.0) for r in timed) / len(timed)  # noqa: E731
    steps, step_s, epoch_s, coreset_s = mean("steps"), mean("step_seconds"), mean("epoch_seconds"), \
        mean("coreset_seconds")
    return {"steps_per_epoch": steps, "step_seconds": step_s, "seconds_per_step": step_s / steps,
            "coreset_seconds": coreset_s, "eval_seconds": epoch_s - step_s - coreset_s,
            "step_samples_per_s": steps * args.batch_size / step_s,
            "epoch_samples_per_s": steps * args.batch_size / (epoch_s - coreset_s),
            "coreset_share_at_every": coreset_s / (args.every * (epoch_s - coreset_s) + coreset_s),
            "final_val_loss": records[-1]["val_loss"], "wall_seconds": time.time() - t0}


def _count_run(args, nproc: int, sharded: bool, work: str, name: str) -> list[dict]:
    """Per-rank step profiles and machine figures (bype.bench._scaling_worker), always through DDP."""
    out = os.path.join(work, f"{name}.json")
    _launch(args, nproc, ["bype.bench._scaling_worker", out,
                          *_common(args, work, name, "ddp" if nproc > 1 else "none", sharded)], args.timeout)
    with open(out) as f:
        return json.load(f)


def _mean(rows: list[dict]) -> dict:
    """Average the numeric fields of repeated runs of one variant."""
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = sum(r[k] for r in rows) / len(rows)
    return out


def predicted_seconds(one: dict, rank: dict, nproc: int, sharded: bool) -> float:
    """The cost model with this machine's measured figures (`rank`, from the counting job of this run) applied
    to the one-process profile `one`: the prediction `bype.bench.perf.cost_model` makes for H100s, made here."""
    from bype.bench.perf.cost_model import Device, predict

    comm = rank.get("allreduce_seconds", 0.0)
    link = 2 * (nproc - 1) / nproc * rank["allreduce_bytes"] / comm if comm > 0 else float("inf")
    dev = Device("this machine", flops=rank["gemm_flops_per_s"], tau=rank["seconds_per_op"],
                 mem_bw=rank["mem_bytes_per_s"], link_in=link, link_out=link, per_node=nproc, alpha=0.0)
    return predict(one, dev, nproc, sharded)["t_step"]


def table(rows: list[dict], every: int) -> str:
    base = rows[0]
    lines = [f"| run | processes x threads | step ms | step / 1 process | per-rank GFLOP | FLOPs / 1 process "
             f"| predicted step ms | coreset update s | eval s | step samples/s | coreset share (every {every}) "
             f"| val loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        flops, pred = r.get("rank_flops"), r.get("predicted_seconds_per_step")
        flops_cells = ("-", "-") if flops is None else (f"{flops / 1e9:.2f}", f"{flops / base['rank_flops']:.2f}")
        lines.append(
            f"| {r['run']} | {r['procs']} x {r['threads_per_proc']} | {1e3 * r['seconds_per_step']:.1f} | "
            f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x | {flops_cells[0]} | {flops_cells[1]} | "
            f"{'-' if pred is None else f'{1e3 * pred:.1f}'} | "
            f"{r['coreset_seconds']:.2f} | {r['eval_seconds']:.2f} | {r['step_samples_per_s']:.0f} | "
            f"{100 * r['coreset_share_at_every']:.1f}% | {r['final_val_loss']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    if args.epochs < 1 or args.repeats < 1:
        raise ValueError("--epochs and --repeats must be >= 1")
    variants = _variants(args)
    for p, _ in variants:
        if args.batch_size % p:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by {p} processes")
    results: dict[tuple[int, bool], list[dict]] = {v: [] for v in variants}
    counts: dict[tuple[int, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bype-scaling-") as work:
        for rep in range(args.repeats):
            for p, sharded in variants:
                name = f"{_label(p, sharded)}-r{rep}"
                results[(p, sharded)].append(_time_run(args, p, sharded, work, name))
        if not args.no_flops:
            for p, sharded in variants:
                counts[(p, sharded)] = _count_run(args, p, sharded, work, f"count-{_label(p, sharded)}")
    rows = []
    one = counts[variants[0]][0] if counts else None
    for p, sharded in variants:
        row = {"run": _label(p, sharded), "procs": p, "threads_per_proc": _threads(args, p), "sharded": sharded,
               "repeats": args.repeats, "global_batch": args.batch_size, **_mean(results[(p, sharded)])}
        if counts:
            ranks = counts[(p, sharded)]
            row.update(rank_flops=ranks[0]["flops"], rank_flops_batch=ranks[0]["flops_batch"],
                       rank_flops_prior=ranks[0]["flops_prior"], rank_ops=ranks[0]["ops"], counted=ranks)
            if variants[0][0] == 1:
                row["predicted_seconds_per_step"] = predicted_seconds(one, ranks[0], p, sharded)
        rows.append(row)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    report = {"engine": args.engine, "device": args.device, "train_limit": args.train_limit,
              "epochs": args.epochs, "every": args.every, "config": args.config, "overrides": args.overrides,
              "machine": machine, "rows": rows}
    write_report(args.out, "scaling", report, table(rows, args.every))
    return 0
