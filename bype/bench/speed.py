"""Training speed of every prior on the same model and data: time per epoch, peak memory, FLOP/s.

  bype bench speed [--config FILE] [--priors gaussian,vampprior,exemplar,bype] [--knn 10]
                   [--steps 30] [--warmup 3] [--sync-debug] [--out DIR] [key.sub=value ...]

Each row trains in its own subprocess through the trainer's own epoch loop (`Trainer.train_epoch`), so the
timed step is exactly the training step and memory is measured per run:

- time per step: the wall clock between batch requests, after `--warmup` untimed steps;
- time per epoch = time per step x steps per epoch + the per-epoch prior hook (the latent cache of the
  Exemplar retrieval mode) + for ByPE the time of one real pseudocoreset update / `coreset.every`;
- peak memory: on CUDA `torch.cuda.max_memory_allocated` after a reset; on CPU the resident-set
  high-water mark VmHWM, reset after set-up through /proc/self/clear_refs (Linux), falling back to the
  `getrusage` ru_maxrss delta; the delta over the post-set-up resident set is what training adds;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one training step (forward, backward, optimiser;
  matrix products and convolutions, as that counter does), divided by the time per step, and compared with
  the machine's fp32 matrix-multiply rate measured once here;
- matmul floor: the step's own matrix products and convolutions (forward, input and weight gradients, each
  with its shapes and memory layout, recorded from one eager step) replayed alone; "x floor" is the time
  per step over it: 1.0 would mean everything besides the matrix products is free;
- compile: with `train.compile` on (`true`, or the `null` default of a long CPU run) the first step runs
  eagerly and the second compiles; that step's time less a median step is reported as compile seconds
  (both are warm-up steps, so `--warmup` must be >= 2 to time compiled steps only);
- `--sync-debug`: `train.sync_debug=true` in every row: the host synchronisations between the trainer's log
  lines (`torch.cuda.set_sync_debug_mode` on CUDA), per timed step.

The Exemplar prior runs as published (`prior.exemplar.subset` exemplars per step, leave-one-out) and, with
`--knn K`, as a second row retrieving the K nearest exemplars from a per-epoch latent cache.
Writes DIR/speed.json and DIR/speed.md.

Longer than the other modules on purpose: one benchmark's driver, its subprocess worker, the matmul floor and
the report read best in one place; each part is a function of its own.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from bype.bench._report import write_report
from bype.device_sync import synchronize as _sync

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "fashion-mnist" / "vae-bype.yaml"
PRIORS = ("gaussian", "vampprior", "exemplar", "bype")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=_display_path(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None,
                   help="shared config; prior.kind is set per row (default: the paper's Fashion-MNIST VAE; '' for "
                        "the built-in defaults)")
    p.add_argument("--priors", default=",".join(PRIORS), help="comma-separated priors to time")
    p.add_argument("--knn", type=int, default=10, help="also time exemplar with k-nearest retrieval (0: skip)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per prior")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--coreset-steps", type=int, default=None,
                   help="time this many steps of the ByPE update and scale to a full one (default: a full update)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n fp32 matmul (2048 CPU, 8192 GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--sync-debug", action="store_true",
                   help="count host synchronisations between log lines (train.sync_debug=true, log_every=--warmup)")
    p.add_argument("--out", default="runs/bench/speed", help="directory for speed.json and speed.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one row, in a subprocess
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every row")


def _display_path(path: Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


# --- rows -----------------------------------------------------------------------------------------
def row_specs(args) -> list[dict]:
    """One spec per row: its name and the overrides that select its prior."""
    priors = [p.strip() for p in args.priors.split(",") if p.strip()]
    unknown = [p for p in priors if p not in PRIORS]
    if unknown:
        raise ValueError(f"--priors: unknown prior {unknown[0]!r} (choose from {', '.join(PRIORS)})")
    rows = []
    for prior in priors:
        rows.append({"row": prior, "prior": prior, "extra": [f"prior.kind={prior}", "prior.exemplar.knn=0"]})
        if prior == "exemplar" and args.knn > 0:
            rows.append({"row": f"exemplar-knn{args.knn}", "prior": prior,
                         "extra": ["prior.kind=exemplar", f"prior.exemplar.knn={args.knn}"]})
    if not rows:
        raise ValueError("--priors: nothing to time")
    return rows


def run(args) -> int:
    if args.worker:
        return _worker(args.worker)
    import torch

    from bype.config import load_config

    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    rows = row_specs(args)
    for r in rows:  # fail on a bad config before any subprocess starts
        load_config(args.config, [*args.overrides, *r["extra"], f"device={args.device}"])
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = _device(args.device)
    os.makedirs(args.out, exist_ok=True)

    load_before = _warn_if_busy(device, threads)
    size = args.matmul_size or (8192 if device == "cuda" else 2048)
    peak = matmul_rate(device, size)
    print(f"fp32 matmul {size}x{size} on {device}: {peak / 1e9:.1f} GFLOP/s ({threads} threads)", flush=True)

    results = []
    for i, r in enumerate(rows):
        print(f"[{i + 1}/{len(rows)}] timing {r['row']}: {args.warmup} + {args.steps} steps", flush=True)
        # log lines (and sync counts) after the warm-up steps, then every as many steps
        sync = ["train.sync_debug=true", f"train.log_every={max(1, args.warmup)}"] if args.sync_debug else []
        spec = {"row": r["row"], "prior": r["prior"], "config": args.config, "device": args.device,
                "overrides": [*args.overrides, *r["extra"], *sync], "steps": args.steps, "warmup": args.warmup,
                "coreset_steps": args.coreset_steps, "threads": threads}
        results.append(_run_worker(spec, args.out))
    _add_derived(results, peak)

    method = next((r["memory_method"] for r in results if "memory_method" in r), None)
    report = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
              "device": device, "threads": threads, "machine": _machine(device),
              "load_average": {"before": load_before, "after": _warn_if_busy(device, threads)},
              "matmul": {"n": size, "flops_per_s": peak}, "memory_method": method,
              "command": command_line(args), "rows": results}
    write_report(args.out, "speed", report, format_table(report))
    return 1 if any("error" in r for r in results) else 0


def command_line(args) -> str:
    """The command as the user could type it again (rebuilt from the parsed arguments)."""
    import shlex

    parts = ["bype", "bench", "speed"]
    for flag in ("config", "priors", "knn", "steps", "warmup", "coreset_steps", "threads", "matmul_size",
                 "device", "out"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) for p in parts + list(args.overrides))


def _run_worker(spec: dict, out: str) -> dict:
    """Time one row in a fresh interpreter, so its memory high-water mark is its own."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out, delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        proc = subprocess.Popen([sys.executable, "-m", "bype.bench.speed", "--worker", path],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        last = ""
        for line in proc.stdout:  # echo the worker's log (set-up, progress) as it comes
            sys.stdout.write("  " + line)
            last = line.strip() or last
        code = proc.wait()
        with open(path) as f:
            result = json.load(f)
        if code != 0 and "error" not in result:
            result["error"] = last or f"worker exited with {code}"
    finally:
        os.unlink(path)
    if "error" in result:
        print(f"  {spec['row']}: failed: {result['error']}", flush=True)
    else:
        print(f"  {spec['row']}: {result['step_s'] * 1e3:.1f} ms/step, {result['epoch_s']:.1f} s/epoch", flush=True)
    return result


def _add_derived(rows: list[dict], peak: float) -> None:
    """Achieved FLOP/s, its fraction of the matmul rate, and each row's epoch time relative to ByPE."""
    ref = next((r["epoch_s"] for r in rows if r.get("row") == "bype" and "epoch_s" in r), None)
    for r in rows:
        if "error" in r:
            continue
        r["flops_per_s"] = r["step_flops"] / r["step_s"]
        r["fraction_of_matmul"] = r["flops_per_s"] / peak
        r["vs_bype"] = r["epoch_s"] / ref if ref else None


def format_table(report: dict) -> str:
    head = ("| prior | ms / step (median) | floor ms | x floor | steps / epoch | epoch hook s | coreset update s "
            "| s / epoch | x ByPE | peak MB | +MB training | GFLOP / step | GFLOP/s | % of matmul | compiled |")
    syncs = any("host_syncs_per_step" in r for r in report["rows"])
    if syncs:
        head += " host syncs / step |"
    n_cols = head.count("|") - 1
    lines = [head, "|" + "---|" * n_cols]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} |" + " |" * (n_cols - 2))
            continue
        upd = f"{r['coreset_update_s']:.1f} / {r['coreset_every']}" if r.get("coreset_update_s") is not None else "-"
        ratio = f"{r['vs_bype']:.2f}" if r.get("vs_bype") else "-"
        median = f" ({r['step_median_s'] * 1e3:.1f})" if "step_median_s" in r else ""
        compiled = (f"yes ({r['compile_s']:.0f} s)" if "compile_s" in r else "yes") if r.get("compiled") else "no"
        line = (f"| {r['row']} | {r['step_s'] * 1e3:.1f}{median} | {r['matmul_floor_s'] * 1e3:.1f} "
                f"| {r['vs_floor']:.2f} | {r['steps_per_epoch']} | {r['epoch_hook_s']:.2f} "
                f"| {upd} | {r['epoch_s']:.1f} | {ratio} | {r['peak_mb']:.0f} | {r['train_delta_mb']:.0f} "
                f"| {r['step_flops'] / 1e9:.2f} | {r['flops_per_s'] / 1e9:.1f} | {100 * r['fraction_of_matmul']:.0f} "
                f"| {compiled} |")
        if syncs:
            line += f" {r['host_syncs_per_step']:.2f} |" if "host_syncs_per_step" in r else " - |"
        lines.append(line)
    m = report["matmul"]
    lines.append("")
    lines.append(f"Device {report['device']} ({report['machine']}), {report['threads']} threads; fp32 matmul "
                 f"{m['n']}x{m['n']}: {m['flops_per_s'] / 1e9:.1f} GFLOP/s. {report['steps']} timed steps per row "
                 f"after {report['warmup']} warm-up steps. Memory: {report['memory_method']}. Floor: the step's "
                 "own matrix products replayed alone; x floor = median step / floor.")
    return "\n".join(lines)


# --- measurements ---------------------------------------------------------------------------------
def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _warn_if_busy(device: str, threads: int) -> Optional[float]:
    """The 1-minute load average; CPU timings taken while other processes compete for the cores are not
    comparable (threads wait on each other), so say so."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if device == "cpu" and load >= (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes compete with the "
              f"{threads} timed thread(s); CPU timings will be inflated and noisy", flush=True)
    return round(load, 2)


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def matmul_rate(device: str, n: int, repeats: int = 5) -> float:
    """The best fp32 FLOP/s of an n x n matrix product: the machine's reachable matmul rate."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up (library initialisation, clocks)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class MemoryMeter:
    """Peak memory of the measured section: reset after set-up, read at the end (see the module doc)."""

    def __init__(self, device):
        import torch

        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        elif _reset_hwm():
            self.base = _proc_status_kb("VmRSS") * 1024
            self.method = "VmHWM (resident high-water mark) reset after set-up via /proc/self/clear_refs"
        else:
            self.base = _maxrss_bytes()
            self.method = "getrusage ru_maxrss delta over set-up (a lower bound when set-up peaked higher)"

    def read(self) -> tuple[float, float]:
        """(peak MB, MB added over the post-set-up baseline)."""
        import torch

        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("VmHWM"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        return peak / 2**20, max(0, peak - self.base) / 2**20


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class TimedLoader:
    """Wraps the training loader: serves `n` batches (cycling epochs if needed) and records the time at each
    batch request, so that mark[k+1] - mark[k] is step k (data, forward, backward, optimiser)."""

    def __init__(self, loader, n: int):
        self.loader, self.n, self.marks = loader, n, []

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int):
        served, e = 0, epoch
        while served < self.n:
            for batch in self.loader.epoch(e):
                if served == self.n:
                    break
                self.marks.append(time.perf_counter())
                yield batch
                served += 1
            e += 1
        self.marks.append(time.perf_counter())


def count_step_flops(trainer) -> int:
    """FLOPs of one training step (forward, backward, optimiser) as FlopCounterMode counts them, on the
    step's eager operators also under `train.compile` (a dispatch mode cannot see into a compiled graph)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bype.models.noise import RowNoise

    model, dev = trainer.model, trainer.ctx.device
    x, _, idx = next(iter(trainer.data.train_loader.epoch(1)))
    model.train()
    noise = RowNoise(trainer.cfg.seed, 1, 0)
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        loss, _ = trainer.engine(model.preprocess(x.to(dev), noise), idx.to(dev), trainer.beta(1), noise)
        trainer.engine.backward(loss)
        trainer.engine.step()
    _sync(dev)
    return int(counter.get_total_flops())


MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward")


def record_matmuls(trainer) -> list:
    """The matrix products and convolutions of one eager training step (forward and backward of the bare
    model), each as (op, copies of its arguments): what `matmul_floor` replays."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bype.models.noise import RowNoise

    ops = {getattr(torch.ops.aten, name).default for name in MATMUL_OPS}

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                self.calls.append((func, [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args],
                                   kwargs or {}))
            return func(*args, **(kwargs or {}))

    model, dev = trainer.model, trainer.ctx.device
    x, _, idx = next(iter(trainer.data.train_loader.epoch(1)))
    model.train()
    noise = RowNoise(trainer.cfg.seed, 1, 0)
    autocast = getattr(trainer.engine, "autocast", {"device_type": dev.type, "enabled": False})
    with Recorder() as rec:
        with torch.autocast(**autocast):
            loss, _ = model(model.preprocess(x.to(dev), noise), idx.to(dev), trainer.beta(1), noise)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return rec.calls


def matmul_floor(calls: list, dev, repeats: int = 20) -> float:
    """Median seconds of the recorded matrix products run back to back, alone."""
    def replay():
        for func, args, kwargs in calls:
            func(*args, **kwargs)
        _sync(dev)

    for _ in range(3):
        replay()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        replay()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def count_hook_flops(trainer) -> int:
    """FLOPs of the prior's per-epoch hook (the Exemplar retrieval mode encodes all N training images)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.model.prior.on_epoch_start(trainer.model)
    return int(counter.get_total_flops())


def measure(spec: dict, work_dir: str) -> dict:
    """Time one prior: `warmup` + `steps` training steps, the per-epoch hook, one coreset update."""
    import torch

    from bype.config import load_config
    from bype.eval.evaluate import model_inputs, validation_loss
    from bype.train.loop import Trainer

    torch.set_num_threads(spec["threads"])
    overrides = [*spec["overrides"], f"device={spec['device']}", f"out_dir={work_dir}", f"name={spec['row']}",
                 "eval.at_end=false"]
    if spec["prior"] == "bype" and spec.get("coreset_steps"):
        overrides.append(f"coreset.steps={spec['coreset_steps']}")
    cfg = load_config(spec["config"], overrides)
    full_config = load_config(spec["config"], [*spec["overrides"], f"device={spec['device']}"])
    trainer = Trainer(cfg)
    dev = trainer.ctx.device
    loader = trainer.data.train_loader
    out = {"row": spec["row"], "prior": spec["prior"], "steps_per_epoch": len(loader),
           "batch_size": cfg.train.batch_size, "n_train": trainer.data.n_train,
           "exemplar_subset": cfg.prior.exemplar.subset if cfg.prior.kind == "exemplar" else None,
           "exemplar_knn": cfg.prior.exemplar.knn if cfg.prior.kind == "exemplar" else None}

    meter = MemoryMeter(dev)
    out.update(_time_steps(trainer, spec["warmup"], spec["steps"]))
    out["epoch_s"] = out["step_s"] * out["steps_per_epoch"] + out["epoch_hook_s"]

    out["coreset_update_s"] = None
    if trainer.coreset is not None:
        out.update(_time_coreset(trainer, full_config, dev))
        out["epoch_s"] += out["coreset_update_s"] / out["coreset_every"]
    out["peak_mb"], out["train_delta_mb"] = meter.read()
    out["memory_method"] = meter.method

    out["step_flops"] = count_step_flops(trainer)
    out["matmul_floor_s"] = matmul_floor(record_matmuls(trainer), dev)
    out["vs_floor"] = out["step_median_s"] / out["matmul_floor_s"]
    out["epoch_hook_flops"] = count_hook_flops(trainer)
    x_val = model_inputs(trainer.model, trainer.data.val)
    t1 = time.perf_counter()
    validation_loss(trainer.model, x_val)
    _sync(dev)
    out["val_s"] = time.perf_counter() - t1
    trainer.metrics.close()
    return out


class _SyncLines(logging.Handler):
    """Collects the trainer's "host syncs between log lines: N in K steps" lines."""

    def __init__(self):
        super().__init__()
        self.counts: list[tuple[int, int]] = []

    def emit(self, record):
        words = record.getMessage().split()
        if record.getMessage().startswith("host syncs between log lines:"):
            self.counts.append((int(words[5]), int(words[7])))


def _time_steps(trainer, warmup: int, steps: int) -> dict:
    """`warmup` + `steps` steps of the trainer's own epoch loop; the per-epoch hook timed apart."""
    from bype.train.compiled_loss import CompiledLoss

    loader = trainer.data.train_loader
    timed = TimedLoader(loader, warmup + steps)
    trainer.data.train_loader = timed
    syncs = _SyncLines()
    logging.getLogger("bype").addHandler(syncs)
    t0 = time.perf_counter()
    try:
        trainer.train_epoch(1)  # on_epoch_start (the per-epoch hook) runs before the first batch request
    finally:
        trainer.data.train_loader = loader
        logging.getLogger("bype").removeHandler(syncs)
    marks = timed.marks
    all_times = [b - a for a, b in zip(marks, marks[1:])]
    times = sorted(all_times[warmup:])
    out = {"epoch_hook_s": marks[0] - t0,
           "step_s": sum(times) / len(times),  # the mean: what an epoch of such steps costs
           "step_median_s": times[len(times) // 2],  # robust to interference from other processes
           "step_max_s": times[-1],
           "compiled": isinstance(getattr(trainer.engine, "loss", None), CompiledLoss)}
    if out["compiled"] and warmup >= 2:  # step 1 eager (records the noise draws), step 2 compiles
        out["compile_s"] = max(0.0, all_times[1] - out["step_median_s"])
    if syncs.counts:  # the first window holds the warm-up (and compile) steps
        timed_counts = syncs.counts[1:] or syncs.counts
        out["host_syncs_between_log_lines"] = syncs.counts
        out["host_syncs_per_step"] = sum(c for c, _ in timed_counts) / max(1, sum(k for _, k in timed_counts))
    return out


def _time_coreset(trainer, full_config, dev) -> dict:
    """One real pseudocoreset update (possibly shortened), scaled to the configured number of steps."""
    cfg = trainer.cfg
    full_steps = full_config.coreset.steps or max(1, trainer.data.n_train // full_config.coreset.batch_size)
    run_steps = trainer.coreset.steps
    t0 = time.perf_counter()
    trainer.coreset.update(cfg.coreset.every)
    _sync(dev)
    seconds = time.perf_counter() - t0
    return {"coreset_update_s": seconds * full_steps / run_steps, "coreset_update_steps": full_steps,
            "coreset_timed_steps": run_steps, "coreset_every": cfg.coreset.every}


def _worker(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        with tempfile.TemporaryDirectory(prefix="bype-speed-") as work:
            result = measure(spec, work)
        code = 0
    except Exception as e:  # reported in the row; the other rows still run
        result = {"row": spec["row"], "prior": spec["prior"], "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        code = 1
    with open(spec_path, "w") as f:
        json.dump(result, f)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bype bench speed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
