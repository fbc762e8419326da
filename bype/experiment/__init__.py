"""Run a grid of training runs and collect their results into a generated docs/RESULTS.md.

  bype experiment GRID.yaml [key.sub=value ...]            run the grid (finished runs are skipped), collect
  bype experiment --priors gaussian,bype [--config FILE] [key.sub=value ...]
  bype experiment GRID.yaml --collect-only                 only regenerate RESULTS.md from the run dirs
  bype experiment GRID.yaml --jobs 4                       train up to 4 runs at the same time

A grid file (see configs/experiments/fashion-mnist-priors.yaml):

  title: ...                       # heading of RESULTS.md
  out_dir: runs/NAME               # run directories are out_dir/<run name>
  overrides: [seed=0, ...]         # applied to every run, before its own
  speed: runs/bench/speed/speed.json   # optional `bype bench speed` output to include
  seeds: [0, 1]                    # optional: every run once per seed (NAME-sSEED), one row over seeds
  notes: |                         # optional: what the results show, printed under the title
    ...
  runs:
    - name: vae-gaussian
      config: ../fashion-mnist/vae-gaussian.yaml   # relative to the grid file
      overrides: [...]

Runs execute one after another as `bype train` subprocesses (each logs to RUN_DIR/train.log too). A run
with report.json is finished and skipped; one with last.pt but no report is resumed; so the command can
be re-run after an interruption. The collected page (tables, plots and pictures under results/ beside it)
embeds the command line of every run and the published Exemplar VAE numbers, marked as published.
Plots and pictures go to results/<basename of out_dir>/ beside the page.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from bype.experiment.grid import load_grid, priors_grid, run_grid, validate_grid
from bype.experiment.report import write_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", nargs="?", help="grid YAML file (or use --priors)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run (last)")
    p.add_argument("--priors", help="comma-separated priors, one run each, on --config with the shared overrides")
    p.add_argument("--config", help="config for --priors runs (default: the built-in defaults)")
    p.add_argument("--out-dir", help="where run directories go (default: the grid's out_dir, else runs/experiment)")
    p.add_argument("--results", default="docs/RESULTS.md",
                   help="the generated page; plots and pictures go to results/ beside it")
    p.add_argument("--speed", help="a `bype bench speed` speed.json to include (default: the grid's speed:)")
    p.add_argument("--collect-only", action="store_true", help="do not train; only regenerate the page")
    p.add_argument("--dry-run", action="store_true", help="print the run commands and exit")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default 1)")


# --- the command ----------------------------------------------------------------------------------
def run(args) -> int:
    overrides = list(args.overrides)
    if args.grid and "=" in args.grid and not args.grid.endswith((".yaml", ".yml")):
        overrides.insert(0, args.grid)  # `bype experiment --priors a,b key=value`: no grid file given
        args.grid = None
    if bool(args.grid) == bool(args.priors):
        raise ValueError("give a grid file or --priors (one of them)")
    if args.grid:
        grid = load_grid(args.grid, args.out_dir, overrides)
    else:
        grid = priors_grid(args.priors, args.config, args.out_dir, overrides)
    speed = args.speed or grid.speed
    command = command_line(args, overrides)
    if not args.collect_only:
        validate_grid(grid)
    if args.dry_run:
        print("\n".join(r.command for r in grid.runs))
        return 0
    if args.jobs < 1:
        raise ValueError(f"--jobs: must be >= 1, got {args.jobs}")
    failed = run_grid(grid, args.jobs) if not args.collect_only else []
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    path = write_results(grid, args.results, command, speed)
    print(f"results: {path}")
    if failed:
        print(f"experiment: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def command_line(args, overrides: list[str]) -> str:
    """The command as the user could type it again (rebuilt from the parsed arguments)."""
    parts = ["bype", "experiment"] + ([args.grid] if args.grid else [])
    for flag in ("priors", "config", "out_dir", "results", "speed"):
        value = getattr(args, flag)
        if value and not (flag == "results" and value == "docs/RESULTS.md"):
            parts += [f"--{flag.replace('_', '-')}", value]
    parts += ["--collect-only"] if args.collect_only else []
    parts += ["--jobs", str(args.jobs)] if getattr(args, "jobs", 1) != 1 and not args.collect_only else []
    return " ".join(shlex.quote(p) for p in parts + overrides)
