"""A grid of training runs: its file format, its expansion into runs (seeds), and running it.

Runs execute as `bype train` subprocesses, `--jobs` at a time; a run with report.json is finished and
skipped, one with last.pt but no report is resumed, so the grid can be re-run after an interruption.
"""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import yaml


# --- the grid -------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str
    config: Optional[str]  # as written in commands (relative to the working directory when possible)
    overrides: list[str]
    out_dir: str
    group: str = ""  # the grid row; runs of one row differ only in their seed

    def __post_init__(self):
        self.group = self.group or self.name

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    def train_args(self) -> list[str]:
        cfg = ["--config", self.config] if self.config else []
        return ["train", *cfg, *self.overrides, f"out_dir={self.out_dir}", f"name={self.name}"]

    @property
    def command(self) -> str:
        return "bype " + " ".join(shlex.quote(a) for a in self.train_args())


@dataclass
class Grid:
    title: str
    out_dir: str
    runs: list[RunSpec]
    speed: Optional[str] = None
    source: Optional[str] = None  # the grid file
    notes: str = ""  # the grid's `notes:`, a reading of the results written after they came in


def _as_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of key.sub=value strings")
    bad = [v for v in value if "=" not in v]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} must look like key.sub=value")
    return value


def _relpath(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def load_grid(path: str, out_dir: Optional[str], extra: list[str]) -> Grid:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: grid file not found") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise ValueError(f"{path}: a grid needs a non-empty 'runs:' list")
    unknown = set(data) - {"title", "out_dir", "overrides", "runs", "speed", "seeds", "notes"}
    if unknown:
        raise ValueError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: title, out_dir, overrides, runs, "
                         "speed, seeds, notes)")
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ValueError(f"{path}: seeds: expected a non-empty list of integers, got {seeds!r}")
    out = out_dir or data.get("out_dir") or "runs/experiment"
    shared = _as_list(data.get("overrides"), f"{path}: overrides")
    here = os.path.dirname(os.path.abspath(path))
    rows = []
    for i, r in enumerate(data["runs"]):
        if not isinstance(r, dict) or not r.get("name"):
            raise ValueError(f"{path}: runs[{i}] needs a name")
        unknown = set(r) - {"name", "config", "overrides"}
        if unknown:
            raise ValueError(f"{path}: runs[{i}]: unknown key {sorted(unknown)[0]!r} (known: name, config, overrides)")
        config = _relpath(os.path.join(here, r["config"])) if r.get("config") else None
        own = _as_list(r.get("overrides"), f"{path}: runs[{i}].overrides")
        rows.append((str(r["name"]), config, own))
    if seeds is None:
        runs = [RunSpec(name, config, [*shared, *own, *extra], out) for name, config, own in rows]
    else:  # one run per seed, NAME-sSEED, grouped into one row of the results; seed-major, so that an
        # interrupted grid holds whole seeds: every row of a finished seed can be compared pairwise
        runs = [RunSpec(f"{name}-s{x}", config, [*shared, f"seed={x}", *own, *extra], out, name)
                for x in seeds for name, config, own in rows]
    _check_names(runs)
    return Grid(data.get("title") or os.path.splitext(os.path.basename(path))[0], out, runs,
                data.get("speed"), path, str(data.get("notes") or "").strip())


def priors_grid(priors: str, config: Optional[str], out_dir: Optional[str], extra: list[str]) -> Grid:
    out = out_dir or "runs/experiment"
    names = [p.strip() for p in priors.split(",") if p.strip()]
    runs = [RunSpec(p, config, [*extra, f"prior.kind={p}"], out) for p in names]
    _check_names(runs)
    return Grid(f"Priors: {', '.join(names)}", out, runs)


def _check_names(runs: list[RunSpec]) -> None:
    seen = set()
    for r in runs:
        if r.name in seen:
            raise ValueError(f"run name {r.name!r} appears twice in the grid")
        if os.sep in r.name or r.name.startswith("."):
            raise ValueError(f"run name {r.name!r}: must be a plain directory name")
        seen.add(r.name)


def validate_grid(grid: Grid) -> None:
    """Resolve every run's config now, so a typo stops the grid before hours of training."""
    from bype.config import ConfigError, load_config

    for r in grid.runs:
        try:
            load_config(r.config, [*r.overrides, f"out_dir={r.out_dir}", f"name={r.name}"])
        except ConfigError as e:
            raise ValueError(f"run {r.name}: {e}") from None


# --- running --------------------------------------------------------------------------------------
def run_status(run_dir: str) -> str:
    if os.path.exists(os.path.join(run_dir, "report.json")):
        return "finished"
    if os.path.exists(os.path.join(run_dir, "last.pt")):
        return "partial"
    return "missing"


def run_grid(grid: Grid, jobs: int = 1) -> list[str]:
    """Train every unfinished run, `jobs` at a time; returns the names of runs that failed."""
    failed, durations = [], []
    todo = [r for r in grid.runs if run_status(r.run_dir) != "finished"]
    print(f"experiment: {len(grid.runs)} runs, {len(grid.runs) - len(todo)} already finished, "
          f"{len(todo)} to train under {grid.out_dir}, {jobs} at a time", flush=True)
    running: list[tuple[RunSpec, subprocess.Popen, float]] = []
    for i, r in enumerate(todo):
        resume = run_status(r.run_dir) == "partial"
        args = ["train", "--resume", r.run_dir] if resume else r.train_args()
        eta = (f", ETA {(len(todo) - i) * sum(durations) / len(durations) / 60 / jobs:.0f} min"
               if durations else "")
        print(f"[{i + 1}/{len(todo)}] {'resuming' if resume else 'training'} {r.name}{eta}\n  bype "
              + " ".join(shlex.quote(a) for a in args), flush=True)
        if not resume:
            _write_command(r)
        cmd = [sys.executable, "-m", "bype.cli", *args]
        log_path = os.path.join(r.run_dir, "train.log")
        if jobs == 1:
            t0 = time.time()
            _finish(r, _run_logged(cmd, log_path), time.time() - t0, durations, failed)
            continue
        running.append((r, _start_logged(cmd, log_path), time.time()))
        while len(running) >= jobs:
            running = _reap(running, durations, failed)
    while running:
        running = _reap(running, durations, failed)
    return failed


def _reap(running: list, durations: list, failed: list) -> list:
    """Wait a moment; finish the runs whose process ended and return the ones still running."""
    time.sleep(2)
    still = []
    for r, proc, t0 in running:
        code = proc.poll()
        if code is None:
            still.append((r, proc, t0))
        else:
            _finish(r, code, time.time() - t0, durations, failed)
    return still


def _finish(r: RunSpec, code: int, seconds: float, durations: list, failed: list) -> None:
    durations.append(seconds)
    if code != 0 or run_status(r.run_dir) != "finished":
        print(f"  {r.name}: failed (exit code {code}); see {os.path.join(r.run_dir, 'train.log')}", flush=True)
        failed.append(r.name)
    else:
        print(f"  {r.name}: finished in {seconds / 60:.1f} min", flush=True)


def _start_logged(cmd: list[str], log_path: str) -> subprocess.Popen:
    """Start `cmd` in the background with its output appended to `log_path` (parallel runs)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a")
    log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _write_command(spec: RunSpec) -> None:
    """Record the command a run was started with; RESULTS.md quotes it even if the grid changes later."""
    os.makedirs(spec.run_dir, exist_ok=True)
    with open(os.path.join(spec.run_dir, "command.txt"), "w") as f:
        f.write(spec.command + "\n")


def recorded_command(spec: RunSpec) -> str:
    path = os.path.join(spec.run_dir, "command.txt")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return f"{spec.command}  # from the grid: the run has no command.txt"


def _run_logged(cmd: list[str], log_path: str) -> int:
    """Run `cmd`, echoing its output and appending it to `log_path`."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


