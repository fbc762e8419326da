"""One prepared check of a GPU machine: kernels, benchmarks, training, NCCL (launch/gpu-check.sh).

  bype bench gpu_check [--dry-run] [--out DIR] [--budget-s 480] [--only STEP,...] [--skip STEP,...]

Each step runs as a subprocess with its own time limit, inside one overall budget (a step whose
limit no longer fits is skipped and says so), and its output goes to DIR/<step>.log. At the end
DIR/gpu-check.json (every step: command, return code, seconds, parsed numbers) and
DIR/gpu-check.md (the summary to paste into docs/KERNELS.md) are written, also after a failure.

`--dry-run` prints the steps and checks the environment (python modules, data, CUDA) without
running anything; on a machine without a GPU it says so and still exits 0 when the plan is sound.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FMNIST_CANDIDATES = ("/usr/share/datasets/fashion-mnist", ".gpudata/fashion-mnist")
MODULES = ("torch", "triton", "numpy", "yaml", "pytest", "webdataset", "matplotlib")
# Output folder of each `bype bench kernels` step.
BENCH_DIRS = {"bench_kernels_large": "bench_large", "bench_kernels_training": "bench_training",
              "bench_kernels_split_programs": "bench_split_programs",
              "bench_kernels_training_split": "bench_training_split", "bench_kernels_profile": "bench_profile"}
# The training comparison: the embedded default job, shortened, on the GPU.
TRAIN_OVERRIDES = ["device=cuda", "eval.at_end=false", "train.max_minutes=0.5", "train.epochs=200",
                   "coreset.every=2", "train.warmup_epochs=5"]


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    limit_s: int
    env: dict = field(default_factory=dict)


def find_fmnist() -> str | None:
    env = os.environ.get("BYPE_FMNIST_ROOT")
    for root in ([env] if env else []) + list(FMNIST_CANDIDATES):
        if root and Path(root, "train-images-idx3-ubyte.gz").exists():
            return str(Path(root).resolve())
    return None


def plan(out: Path, fmnist: str | None) -> list[Step]:
    py = sys.executable
    bype = [py, "-m", "bype.cli"]
    data = [f"data.root={fmnist}"] if fmnist else []
    compiled = {"TRITON_INTERPRET": "0"}  # real GPU kernels, never the interpreter
    runs = str(out / "runs")

    def speed(name: str, what: str, overrides: list, limit_s: int, env=None) -> Step:
        """A `bype bench speed --device cuda` step (Gaussian and ByPE priors, 30 timed steps) into its folder."""
        return Step(name, what, bype + ["bench", "speed", "--device", "cuda", "--priors", "gaussian,bype", "--knn", "0",
                                        "--steps", "30", "--warmup", "5", "--coreset-steps", "20",
                                        "--out", str(out / name), *data, *overrides],
                    limit_s, {**compiled, **(env or {})})

    def bench(name: str, what: str, B: str, M: str, impls: str, repeats: int, limit_s: int, env=None,
              passes: str = "fwd,fwdbwd", extra=()) -> Step:
        """A `bype bench kernels --device cuda` step (d = 40) into its folder."""
        return Step(name, what, bype + ["bench", "kernels", "--device", "cuda", "--B", B, "--M", M, "--d", "40",
                                        "--impls", impls, "--passes", passes, "--repeats", str(repeats), *extra,
                                        "--out", str(out / BENCH_DIRS[name])], limit_s, {**compiled, **(env or {})})
    # In order of what the kernels' goals need: correctness on CUDA (it also compiles every kernel variant
    # into Triton's cache for the later steps), the two benchmark shapes, the split-rule A/B; then the
    # training comparisons and the test files, which a short budget may cut.
    return [
        Step("env", "GPU, driver, torch / triton versions",
             [py, "-c", _ENV_PROBE], 30),
        Step("kernel_accuracy", "Triton on CUDA against a float64 reference, forward and all gradients; "
             "registers and spills of the compiled kernels",
             [py, "-m", "bype.bench._gpu_accuracy", "--json", str(out / "kernel_accuracy.json")], 120, compiled),
        bench("bench_kernels_large", "bype bench kernels --device cuda at B=1024, M=50,000, d=40",
              "1024", "50000", "naive,chunked,compiled,triton", 10, 150),  # 90 s ran out on an H100 (cold compiles)
        bench("bench_kernels_training", "bype bench kernels --device cuda at the training shapes B=100, M=500 and "
              "25,000", "100", "500,25000", "naive,chunked,compiled,triton", 20, 75),
        bench("bench_kernels_split_programs", "Triton at B=1024, M=50,000, d=40 with the program-count split rule "
              "(BYPE_KERNEL_SPLIT=programs), against the whole-wave rule of bench_kernels_large",
              "1024", "50000", "triton", 10, 45, {"BYPE_KERNEL_SPLIT": "programs"}),
        bench("bench_kernels_training_split", "Triton at the training shape B=100, M=500, d=40 with the split plan "
              "(BYPE_MIXTURE_PLAN=split), against the one-launch fused plan of bench_kernels_training",
              "100", "500", "triton", 20, 30, {"BYPE_MIXTURE_PLAN": "split"}),
        bench("bench_kernels_profile", "Triton forward + backward under torch.profiler at B=100, 1024 and M=500, "
              "50,000: device time per kernel (prep, tiled passes, combination; fused)", "100,1024", "500,50000",
              "triton", 5, 45, passes="fwdbwd", extra=["--profile"]),
        Step("train_triton", "ByPE-VAE on Fashion-MNIST on the GPU, mixture prior through Triton (30 s)",
             bype + ["train", f"out_dir={runs}", "name=triton"] + data + TRAIN_OVERRIDES, 75,
             {**compiled, "BYPE_KERNEL_IMPL": "triton"}),
        Step("train_torch", "the same run with the torch path of the prior",
             bype + ["train", f"out_dir={runs}", "name=torch"] + data + TRAIN_OVERRIDES, 75,
             {**compiled, "BYPE_KERNEL_IMPL": "torch"}),
        speed("speed_eager", "bype bench speed --device cuda: the Gaussian and ByPE training steps, eager (the GPU "
              "default), against their matmul floors", [], 120),
        speed("speed_compiled", "the same with train.compile=true (CUDA graphs), once slower than eager at batch 100: "
              "is it still? (its log names recompiles, graph breaks and skipped CUDA graphs)", ["train.compile=true"],
              240, {"TORCH_LOGS": "recompiles,graph_breaks,perf_hints"}),
        Step("ddp_nccl", "one DDP process on the GPU over NCCL (torchrun), one short epoch",
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "bype.cli", "train",
              f"out_dir={runs}", "name=ddp", "dist.engine=ddp", "dist.backend=nccl", "device=cuda",
              "data.train_limit=10000", "train.epochs=2", "coreset.every=1", "eval.at_end=false"] + data,
             75, compiled),
        Step("kernel_tests", "kernel test files with compiled Triton (CUDA parameters where the tests have them)",
             [py, "-m", "pytest", "-q", "-rs", "tests/test_kernels_mixture.py", "tests/test_kernels_coreset.py",
              "-p", "no:cacheprovider"], 150, compiled),
    ]


_ENV_PROBE = r"""
import json, torch
info = dict(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
try:
    import triton; info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sm=f"{p.major}{p.minor}", multiprocessors=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
print("ENV " + json.dumps(info))
"""


def check_environment(fmnist: str | None) -> list[str]:
    """Problems that would stop the real run (empty: the plan can run)."""
    problems = [f"python module {m!r} not importable" for m in MODULES if importlib.util.find_spec(m) is None]
    if fmnist is None:
        problems.append("Fashion-MNIST not found (set BYPE_FMNIST_ROOT or copy it to .gpudata/fashion-mnist)")
    for path in ("tests/test_kernels_mixture.py", "tests/test_kernels_coreset.py"):
        if not Path(path).exists():
            problems.append(f"{path} missing (run from the repository root)")
    return problems


def cuda_present() -> bool:
    import torch
    return torch.cuda.is_available()


def run_step(step: Step, out: Path, limit_s: float) -> dict:
    log = out / f"{step.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(step.argv, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = round(time.time() - t0, 1)
    text = log.read_text(errors="replace")
    return dict(name=step.name, what=step.what, argv=step.argv, rc=rc, seconds=seconds,
                tail=text[-1500:], **parse(step.name, text, out))


# --- parsing each step's output into numbers -------------------------------------------------------
def parse(name: str, text: str, out: Path) -> dict:
    if name == "env":
        line = next((l for l in text.splitlines() if l.startswith("ENV ")), None)
        return {"env": json.loads(line[4:])} if line else {}
    if name == "kernel_tests":
        last = [l for l in text.splitlines() if " in " in l and ("passed" in l or "failed" in l or "error" in l)]
        return {"summary": last[-1].strip("= ") if last else None}
    if name == "kernel_accuracy":
        p = out / "kernel_accuracy.json"
        return {"records": json.loads(p.read_text())} if p.exists() else {}
    if name.startswith("bench_kernels"):
        p = out / BENCH_DIRS[name] / "kernels.json"
        return {"rows": json.loads(p.read_text())["rows"], "bench_md": str(p.with_suffix(".md"))} if p.exists() else {}
    if name.startswith("speed_"):
        p = out / name / "speed.json"
        keys = ("row", "step_s", "matmul_floor_s", "vs_floor", "fraction_of_matmul", "compiled", "coreset_update_s")
        return {"rows": [{k: r.get(k) for k in keys} for r in json.loads(p.read_text())["rows"]]} if p.exists() else {}
    if name.startswith("train") or name == "ddp_nccl":
        run = out / "runs" / {"train_triton": "triton", "train_torch": "torch", "ddp_nccl": "ddp"}[name]
        p = run / "metrics.jsonl"
        if not p.exists():
            return {}
        epochs = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
        epochs = [e for e in epochs if "val_loss" in e]
        steps = sum(e.get("steps", 0) for e in epochs)
        step_s = sum(e.get("step_seconds", 0.0) for e in epochs)
        return {"epochs": [{k: e.get(k) for k in ("epoch", "train_loss", "val_loss", "steps", "step_seconds",
                                                  "coreset_seconds")} for e in epochs],
                "ms_per_step": round(1000 * step_s / steps, 3) if steps else None}
    return {}


def compare_training(results: dict) -> dict | None:
    a, b = results.get("train_triton", {}), results.get("train_torch", {})
    ea, eb = a.get("epochs") or [], b.get("epochs") or []
    n = min(len(ea), len(eb))
    if n == 0:
        return None
    diffs = [abs(x["val_loss"] - y["val_loss"]) / abs(y["val_loss"]) for x, y in zip(ea[:n], eb[:n])]
    # fp32 kernels that sum in another order drift apart over training; 1e-3 relative after a few
    # hundred steps is the size of that drift, a wrong gradient moves the loss by far more.
    return dict(common_epochs=n, max_rel_val_diff=max(diffs), first_epoch_rel_diff=diffs[0],
                equal_within_1e3=max(diffs) <= 1e-3,
                ms_per_step_triton=a.get("ms_per_step"), ms_per_step_torch=b.get("ms_per_step"))


# --- summary ----------------------------------------------------------------------------------------
def summary_markdown(results: dict, meta: dict) -> str:
    env = results.get("env", {}).get("env", {})
    lines = ["# GPU check", "", f"{meta['date']}, {env.get('gpu', 'no GPU')} (sm_{env.get('sm', '?')}, "
             f"{env.get('multiprocessors', '?')} SMs), torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"triton {env.get('triton')}.", "", "| step | result | seconds |", "|---|---|---|"]
    for r in results.values():
        ok = "ok" if r["rc"] == 0 else f"rc={r['rc']}"
        lines.append(f"| {r['name']} | {ok} | {r['seconds']} |")
    tests = results.get("kernel_tests", {}).get("summary")
    if tests:
        lines += ["", f"Kernel tests: {tests}"]
    acc = results.get("kernel_accuracy", {}).get("records")
    if acc:
        lines += ["", "## Triton on CUDA vs float64 (error relative to each tensor's largest entry)", "",
                  "| op | shape | mode | largest | per tensor | ms |", "|---|---|---|---|---|---|"]
        for r in acc.get("accuracy", []):
            e = r["errors"]
            per = ", ".join(f"{k} {v:.1e}" for k, v in e.items()) or r.get("error", "")
            lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | "
                         f"{max(e.values()) if e else float('nan'):.1e} | {per} | {r.get('ms', '-')} |")
        if acc.get("compiled"):
            lines += ["", "Compiled kernels (from Triton's cache): registers, spills, shared memory", "",
                      "| kernel | regs | spills | shared bytes | num_warps | num_stages |", "|---|---|---|---|---|---|"]
            for k in acc["compiled"]:
                lines.append(f"| {k['kernel']} | {k.get('n_regs')} | {k.get('n_spills')} | {k.get('shared')} | "
                             f"{k.get('num_warps')} | {k.get('num_stages')} |")
    for name in BENCH_DIRS:
        rows = results.get(name, {}).get("rows")
        if rows:
            table = out_dir_table(results[name])
            lines += ["", f"## {name}", "", table.strip()] if table else []
            lines += [f"- {k}" for k in triton_ratios(rows)]
    lines += split_rule_lines(results) + plan_lines(results) + speed_lines(results)
    cmp_ = meta.get("training_comparison")
    if cmp_:
        lines += ["", "## ByPE training on the GPU: Triton vs torch prior", "",
                  f"{cmp_['common_epochs']} common epochs; ms per step: triton {cmp_['ms_per_step_triton']}, "
                  f"torch {cmp_['ms_per_step_torch']}; largest relative validation-loss difference "
                  f"{cmp_['max_rel_val_diff']:.2e} (first epoch {cmp_['first_epoch_rel_diff']:.2e})."]
    ddp = results.get("ddp_nccl")
    if ddp:
        lines += ["", f"DDP over NCCL, one process: rc={ddp['rc']}, {ddp.get('ms_per_step')} ms per step."]
    return "\n".join(lines) + "\n"


def out_dir_table(result: dict) -> str:
    p = Path(result.get("bench_md", ""))
    return p.read_text() if p.is_file() else ""


def _triton_times(results: dict, name: str) -> dict:
    rows = results.get(name, {}).get("rows") or []
    return {(r["passes"], r["B"], r["M"], r["d"]): r["time_s"] for r in rows
            if r.get("impl") == "triton" and "time_s" in r}


def ab_lines(results: dict, base: str, other: str, title: str, labels: tuple[str, str]) -> list[str]:
    """Triton's time in step ``base`` against step ``other`` (the same shapes under another setting)."""
    a, b = _triton_times(results, base), _triton_times(results, other)
    out = [f"- triton {p} B={B} M={M} d={d}: {labels[0]} {a[k] * 1e3:.3f} ms, {labels[1]} {b[k] * 1e3:.3f} ms "
           f"({b[k] / a[k]:.2f}x)" for k in sorted(a) if k in b for p, B, M, d in [k]]
    return ["", f"## {title}", "", *out] if out else []


def split_rule_lines(results: dict) -> list[str]:
    """Triton under the whole-wave split rule (bench_kernels_large) against the program-count rule."""
    return ab_lines(results, "bench_kernels_large", "bench_kernels_split_programs", "Split rule (BYPE_KERNEL_SPLIT)",
                    ("whole waves", "program count"))


def plan_lines(results: dict) -> list[str]:
    """Triton at the training shape with the fused plan (bench_kernels_training) against the split plan."""
    return ab_lines(results, "bench_kernels_training", "bench_kernels_training_split",
                    "Plan at the training shape (BYPE_MIXTURE_PLAN)", ("fused", "split"))


def speed_lines(results: dict) -> list[str]:
    """The training step on the GPU, eager and compiled (bype bench speed): ms per step against the floor."""
    out = []
    for name in ("speed_eager", "speed_compiled"):
        for r in results.get(name, {}).get("rows") or []:
            if r.get("step_s"):
                floor = f", matmul floor {r['matmul_floor_s'] * 1e3:.2f} ms ({r['vs_floor']:.2f}x)" if r.get(
                    "matmul_floor_s") else ""
                out.append(f"- {name.removeprefix('speed_')} {r['row']}: {r['step_s'] * 1e3:.2f} ms per step{floor}")
    return ["", "## Training step on the GPU (bype bench speed)", "", *out] if out else []


def triton_ratios(rows: list[dict]) -> list[str]:
    """Triton's speed-up over torch eager (naive, chunked) and torch.compile, per shape and pass: synchronised
    calls, and back to back where the rows have it (the host's pace, not only the device's)."""
    out = []
    for key, label in (("time_s", ""), ("b2b_s", " back to back")):
        t = {(r["impl"], r["passes"], r["B"], r["M"], r["d"]): r[key] for r in rows if key in r}
        for (impl, pname, B, M, d), ts in sorted(t.items()):
            if impl != "triton":
                continue
            ratios = [f"{other} {t[(other, pname, B, M, d)] / ts:.2f}x" for other in ("naive", "chunked", "compiled")
                      if (other, pname, B, M, d) in t]
            if ratios:  # steps that time Triton alone (A/B, profile) have no baseline here
                out.append(f"triton {pname} B={B} M={M} d={d}{label}: {ts * 1e3:.3f} ms; faster than "
                           + ", ".join(ratios))
    return out


# --- entry points -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the steps and check the environment only")
    p.add_argument("--out", default="runs/gpu-check", help="directory for gpu-check.json/.md and the logs")
    p.add_argument("--budget-s", type=float, default=420, help="overall time budget in seconds (default 7 min)")
    p.add_argument("--only", default="", help="comma-separated step names to run")
    p.add_argument("--skip", default="", help="comma-separated step names to leave out")


def run(args) -> int:
    out = Path(args.out)
    fmnist = find_fmnist()
    steps = plan(out, fmnist)
    names = [s.name for s in steps]
    for opt in (args.only, args.skip):
        unknown = [n for n in opt.split(",") if n and n not in names]
        if unknown:
            raise SystemExit(f"bype bench gpu_check: unknown step(s) {unknown}; steps are {names}")
    if args.only:
        steps = [s for s in steps if s.name in args.only.split(",")]
    steps = [s for s in steps if s.name not in args.skip.split(",")]
    problems = check_environment(fmnist)
    total = sum(s.limit_s for s in steps)
    print(f"gpu-check: {len(steps)} steps, at most {total} s of limits within a {args.budget_s:.0f} s budget")
    for s in steps:
        env = " ".join(f"{k}={v}" for k, v in s.env.items())
        print(f"  [{s.name}] <= {s.limit_s} s: {s.what}\n      {env + ' ' if env else ''}{' '.join(s.argv[:8]) if s.name != 'env' else s.argv[0] + ' -c <probe>'}"
              f"{' ...' if len(s.argv) > 8 and s.name != 'env' else ''}")
    for p in problems:
        print(f"  problem: {p}")
    has_cuda = cuda_present()
    if args.dry_run:
        print("gpu-check: CUDA device present" if has_cuda else
              "gpu-check: no CUDA device here: the real run needs one (this dry run only checks the plan)")
        return 1 if problems else 0
    if problems:
        raise SystemExit("gpu-check: cannot run: " + "; ".join(problems))
    if not has_cuda:
        raise SystemExit("gpu-check: no CUDA device (torch.cuda.is_available() is False); use --dry-run here")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results, meta = {}, dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node())
    for s in steps:
        left = args.budget_s - (time.time() - t_start)
        if left < min(s.limit_s, 20):
            results[s.name] = dict(name=s.name, what=s.what, argv=s.argv, rc="skipped (budget)", seconds=0)
            print(f"[{s.name}] skipped: {left:.0f} s of the budget left")
            continue
        print(f"[{s.name}] {s.what} (limit {min(s.limit_s, left):.0f} s) ...", flush=True)
        results[s.name] = r = run_step(s, out, min(s.limit_s, left))
        print(f"[{s.name}] rc={r['rc']} in {r['seconds']} s", flush=True)
        meta["training_comparison"] = compare_training(results)
        _write(out, results, meta)  # after every step: a later crash or timeout loses nothing
    print(f"gpu-check: done in {time.time() - t_start:.0f} s; wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


def _write(out: Path, results: dict, meta: dict) -> None:
    from bype.atomic import write_text_atomic
    write_text_atomic(str(out / "gpu-check.json"), json.dumps(dict(meta=meta, steps=results), indent=1, default=str))
    write_text_atomic(str(out / "gpu-check.md"), summary_markdown(results, meta))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bype bench gpu_check", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
