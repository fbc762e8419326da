"""Cost of the pseudocoreset update against the training-set size N, exact and minibatch data terms.

  bype bench coreset [--n 10000,50000,500000] [--m 500] [--s 500] [--steps 20] [--modes exact,minibatch]
                     [--arch vae] [--hidden 300] [--latent 40] [--threads T] [--device cpu] [--out DIR]

Rows of real Fashion-MNIST (the 50k training split) are tiled to N. For each N and data-term mode it
times, on the paper's VAE with M pseudodata and S samples per step:

- the sufficient-statistics pass (exact mode only): O(N D), once per run;
- one update step (the median over the steps of a timed update, after an untimed warm-up update; the
  median resists other processes sharing the cores);
- the CPU time per step of the process (over the timed update and its final KL evaluation): with
  `--threads 1` a measure that other processes on the cores barely disturb;
- a whole update of `--steps` steps (the configured schedule runs N / coreset.batch_size steps, so
  the reference's cost per update grows with N through the step count, never through a step).

Writes DIR/coreset.json and prints a Markdown table. Shrink with `--n 10000,50000 --steps 5`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

DEFAULT_N = "10000,50000,500000"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", default=DEFAULT_N, help="comma-separated training-set sizes (real rows tiled)")
    p.add_argument("--m", type=int, default=500, help="pseudodata points M")
    p.add_argument("--s", type=int, default=500, help="z samples per step S")
    p.add_argument("--steps", type=int, default=20, help="steps of the timed whole update")
    p.add_argument("--batch-size", type=int, default=100, help="rows per step of the minibatch data term")
    p.add_argument("--modes", default="exact,minibatch", help="data-term modes to time")
    p.add_argument("--arch", choices=("vae", "hvae", "convhvae"), default="vae")
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--latent", type=int, default=40)
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default: the system data set)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="runs/bench/coreset", help="directory for coreset.json")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{flag}: expected positive integers, got {text!r}")
    return values


def tiled(split, n: int):
    """The first n rows of `split` repeated end to end (a synthetic large N made of real images)."""
    from bype.data.memory import Split

    reps = math.ceil(n / len(split))
    return Split(split.x.repeat(reps, 1, 1, 1)[:n], split.y.repeat(reps)[:n])


def _model(args, device: torch.device):
    from bype.config import load_config
    from bype.models import build_model

    cfg = load_config(None, [f"model.arch={args.arch}", f"model.hidden={args.hidden}",
                             f"model.latent_dim={args.latent}", f"prior.components={args.m}"])
    torch.manual_seed(0)
    return build_model(cfg, (1, 28, 28)).to(device)


def time_row(args, split, stats: dict, mode: str, device: torch.device) -> dict:
    from bype.coreset import PseudocoresetOptimizer
    from bype.data import DataBundle

    n = len(split)
    data = DataBundle((1, 28, 28), n, None, None, None, stats, _train_split=split)
    model = _model(args, device)
    model.prior.init_from_data(data.init_rows(args.m, torch.Generator().manual_seed(0)).to(device), n)
    opt = PseudocoresetOptimizer(model, data, steps=2, samples=args.s, batch_size=args.batch_size, data_term=mode)
    opt.update(1)  # warm-up: allocator, first-call overheads
    opt.steps = args.steps
    cpu0 = time.process_time()
    result = opt.update(2)
    # CPU time of the process: with one thread it barely moves when other processes share the cores.
    cpu_ms = 1e3 * (time.process_time() - cpu0) / (args.steps + 2)  # + the held-out evaluations
    times = sorted(opt.step_seconds)
    return {"n": n, "mode": mode, "grad_path": opt.grad_path, "step_ms": 1e3 * times[len(times) // 2],
            "step_ms_mean": 1e3 * result["seconds_per_step"], "cpu_ms_per_step": cpu_ms,
            "update_s": result["seconds"], "steps": args.steps,
            "half_var_before": result["heldout_half_var_before"], "half_var_after": result["heldout_half_var_after"]}


def run(args) -> int:
    from bype.coreset.data_term import stream_stats
    from bype.data.memory import load_idx_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    ns = _ints(args.n, "--n")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("exact", "minibatch")]
    if bad or not modes:
        raise ValueError(f"--modes: expected exact and/or minibatch, got {args.modes!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    device = torch.device(args.device)
    base, _, _ = load_idx_dataset("fashion-mnist", args.root)

    rows = []
    for n in ns:
        split = tiled(base, n)
        t0 = time.perf_counter()
        stats = stream_stats(split.x)
        stats_s = time.perf_counter() - t0
        for mode in modes:
            row = time_row(args, split, stats, mode, device)
            row["stats_s"] = stats_s if mode == "exact" else None
            rows.append(row)
            print(_format_row(row), flush=True)
        del split

    meta = {"m": args.m, "s": args.s, "steps": args.steps, "batch_size": args.batch_size, "arch": args.arch,
            "hidden": args.hidden, "latent": args.latent, "device": str(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}  # other processes on the cores skew timings
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "coreset.json")
    with open(path, "w") as f:
        json.dump({"settings": meta, "rows": rows}, f, indent=2)
    print()
    print(table(rows, meta))
    print(f"\nwrote {path}")
    return 0


HEADER = ("| N | data term | stats pass (s, once) | ms / step (median) | CPU ms / step | update of {steps} steps (s) "
          "| held-out ½Var(R) before -> after |\n|---:|---|---:|---:|---:|---:|---|")


def _format_row(r: dict) -> str:
    stats = f"{r['stats_s']:.2f}" if r.get("stats_s") is not None else "-"
    return (f"| {r['n']:,} | {r['mode']} ({r['grad_path']}) | {stats} | {r['step_ms']:.1f} | {r['cpu_ms_per_step']:.1f} "
            f"| {r['update_s']:.2f} | {r['half_var_before']:.4g} -> {r['half_var_after']:.4g} |")


def table(rows: list[dict], meta: dict) -> str:
    head = (f"{meta['arch']} (hidden {meta['hidden']}, latent {meta['latent']}), M={meta['m']}, S={meta['s']}, "
            f"B={meta['batch_size']} (minibatch), {meta['device']}, {meta['threads']} threads on {meta['cpu_count']} "
            f"cores (load average {meta['load_avg_1min']}), torch {meta['torch']}")
    return "\n".join([head, "", HEADER.format(steps=meta["steps"])] + [_format_row(r) for r in rows])
