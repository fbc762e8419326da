"""The generated results page of a grid: run directories collected into tables, plots and pictures."""
from __future__ import annotations

import datetime
import glob
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import yaml

from bype.experiment.grid import Grid, RunSpec, _relpath, recorded_command, run_status
from bype.experiment.tables import coreset_section, cost_ratio, paired_table, priors_table, seed_table

# Published test log-likelihoods (nats, 40-d latent) of the Exemplar VAE paper (Norouzi et al., 2020, Table 1).
PUBLISHED = {
    ("vae", "gaussian"): {"mnist": -84.45, "fashion-mnist": -228.70},
    ("vae", "vampprior"): {"mnist": -82.43, "fashion-mnist": -227.35},
    ("vae", "exemplar"): {"mnist": -82.09, "fashion-mnist": -226.75},
    ("hvae", "gaussian"): {"mnist": -82.39, "fashion-mnist": -227.37},
    ("hvae", "vampprior"): {"mnist": -81.56, "fashion-mnist": -226.72},
    ("hvae", "exemplar"): {"mnist": -81.22, "fashion-mnist": -226.53},
    ("convhvae", "gaussian"): {"mnist": -80.52, "fashion-mnist": -225.38},
    ("convhvae", "vampprior"): {"mnist": -79.67, "fashion-mnist": -224.67},
    ("convhvae", "exemplar"): {"mnist": -79.58, "fashion-mnist": -224.63},
}
ARCH_NAMES = {"vae": "VAE", "hvae": "HVAE", "convhvae": "ConvHVAE"}
PRIOR_NAMES = {"gaussian": "Gaussian prior", "vampprior": "VampPrior", "exemplar": "Exemplar", "bype": "ByPE"}
PICTURES = ("samples.png", "coreset.png", "coreset_weights.png")


# --- collecting -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    spec: RunSpec
    status: str
    config: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)  # the test evaluation with the most IS samples
    augment: Optional[dict] = None

    @property
    def prior(self) -> str:
        return self.report.get("prior") or self.config.get("prior", {}).get("kind", "?")

    @property
    def arch(self) -> str:
        return self.report.get("arch") or self.config.get("model", {}).get("arch", "?")

    @property
    def dataset(self) -> str:
        return self.report.get("dataset") or self.config.get("data", {}).get("dataset", "?")


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def collect_run(spec: RunSpec) -> RunResult:
    from bype.train.metrics import read_metrics

    d = spec.run_dir
    result = RunResult(spec, run_status(d), metrics=read_metrics(d) if os.path.isdir(d) else [])
    if os.path.exists(os.path.join(d, "config.yaml")):
        with open(os.path.join(d, "config.yaml")) as f:
            result.config = yaml.safe_load(f) or {}
    result.report = _read_json(os.path.join(d, "report.json")) or {}
    # `bype eval RUN --samples S` writes eval_S<S>.json; prefer the whole test set, then the most samples
    # (the tightest bound).
    evals = [e for e in [result.report, *(_read_json(p) for p in glob.glob(os.path.join(d, "eval_S*.json")))]
             if e and "test_nll" in e]
    if evals:
        result.evaluation = max(evals, key=lambda e: (e.get("n_test", 0), e.get("is_samples", 0)))
    result.augment = _read_json(os.path.join(d, "augment.json"))
    return result


def _fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _epoch_rows(res: RunResult) -> list[dict]:
    return [m for m in res.metrics if "epoch" in m and "val_loss" in m]


def summary_table(results: list[RunResult]) -> str:
    lines = ["| run | prior | arch | data (N) | epochs (stop) | train min | s / epoch | best val -ELBO (epoch) "
             "| test NLL (S, n) | test -ELBO | kNN acc (k=5) |", "|" + "---|" * 11]
    for r in results:
        rows, e, rep = _epoch_rows(r), r.evaluation, r.report
        epochs = rep.get("epochs", len(rows)) if (rep or rows) else None
        train_s = rep.get("train_seconds", rows[-1]["train_seconds"] if rows else None)
        per_epoch = train_s / epochs if train_s and epochs else None
        best = min(rows, key=lambda m: m["val_loss"]) if rows else None
        stop = rep.get("stop_reason") or ("" if r.status == "finished" else r.status)
        best_s = f"{best['val_loss']:.2f} ({best['epoch']})" if best else "-"
        nll_s = f"{e['test_nll']:.2f} ({e.get('is_samples', '?')}, {e.get('n_test', '?')})" if e else "-"
        lines.append(
            f"| {r.spec.name} | {r.prior} | {r.arch} | {r.dataset} ({rep.get('n_train', '?')}) "
            f"| {_fmt(epochs, 'd')}{f' ({stop})' if stop else ''} | {_fmt(train_s / 60 if train_s else None, '.1f')} "
            f"| {_fmt(per_epoch, '.1f')} | {best_s} | {nll_s} "
            f"| {_fmt(-e['test_elbo'] if 'test_elbo' in e else None)} | {_fmt(e.get('knn_5'), '.4f')} |")
    return "\n".join(lines)


def published_table(results: list[RunResult]) -> str:
    """Our test log-likelihood beside the published one for the same architecture, prior and data set."""
    lines = ["| model | data set | test LL, published (Exemplar VAE paper) | test LL, ours | ours - published |",
             "|---|---|---|---|---|"]
    for r in results:
        ours = -r.evaluation["test_nll"] if "test_nll" in r.evaluation else None
        pub = PUBLISHED.get((r.arch, r.prior), {}).get(r.dataset)
        model = f"{ARCH_NAMES.get(r.arch, r.arch)}, {PRIOR_NAMES.get(r.prior, r.prior)} ({r.spec.name})"
        diff = _fmt(ours - pub, "+.2f") if ours is not None and pub is not None else "-"
        lines.append(f"| {model} | {r.dataset} | {_fmt(pub, '.2f', 'not published')} | {_fmt(ours)} | {diff} |")
    return "\n".join(lines)


def knn_table(results: list[RunResult]) -> Optional[str]:
    ks = sorted({int(k[4:]) for r in results for k in r.evaluation if k.startswith("knn_")})
    if not ks:
        return None
    lines = ["| run | " + " | ".join(f"k={k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 1)]
    for r in results:
        lines.append(f"| {r.spec.name} | " + " | ".join(_fmt(r.evaluation.get(f"knn_{k}"), ".4f") for k in ks) + " |")
    return "\n".join(lines)


def augment_table(results: list[RunResult]) -> Optional[str]:
    rows = [r for r in results if r.augment]
    if not rows:
        return None
    lines = ["| run | classifier epochs | train images | test error, real only | test error, real + generated |",
             "|---|---|---|---|---|"]
    for r in rows:
        a = r.augment
        lines.append(f"| {r.spec.name} | {a.get('epochs')} | {a.get('n_train')} "
                     f"| {100 * a['error_real']:.2f}% | {100 * a['error_augmented']:.2f}% |")
    return "\n".join(lines)


def plot_curves(results: list[RunResult], out_dir: str) -> dict[str, str]:
    """Validation curves per epoch and against wall clock (with the final test NLL), as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_rows = [(r, _epoch_rows(r)) for r in results if _epoch_rows(r)]
    if not with_rows:
        return {}
    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, rows in with_rows:
        ax.plot([m["epoch"] for m in rows], [m["val_loss"] for m in rows], label=r.spec.name)
    ax.set(xlabel="epoch", ylabel="validation -ELBO (nats)", title="Validation curves")
    _zoom(ax, [m["val_loss"] for _, rows in with_rows for m in rows])
    ax.legend()
    fig.tight_layout()
    paths["val_curves"] = os.path.join(out_dir, "val_curves.png")
    fig.savefig(paths["val_curves"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for r, rows in with_rows:
        minutes = [m["train_seconds"] / 60 for m in rows]
        line, = ax.plot(minutes, [m["val_loss"] for m in rows], label=f"{r.spec.name} (val -ELBO)")
        values += [m["val_loss"] for m in rows]
        if "test_nll" in r.evaluation:
            # The evaluated model is the best checkpoint: place its NLL where training had reached it.
            best = r.report.get("best_epoch")
            at = next((m["train_seconds"] / 60 for m in rows if m["epoch"] == best), minutes[-1])
            ax.plot([at], [r.evaluation["test_nll"]], marker="*", markersize=14, color=line.get_color(),
                    linestyle="none", label=f"{r.spec.name} test NLL (S={r.evaluation.get('is_samples')})")
            values.append(r.evaluation["test_nll"])
    ax.set(xlabel="training wall clock (minutes)", ylabel="nats", title="NLL against wall-clock time")
    _zoom(ax, values)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["nll_vs_time"] = os.path.join(out_dir, "nll_vs_time.png")
    fig.savefig(paths["nll_vs_time"], dpi=110)
    plt.close(fig)
    return paths


def _zoom(ax, values: list[float]) -> None:
    """Show the interesting range: the first epochs' losses dwarf the differences between priors."""
    if len(values) < 4:
        return
    vs = sorted(values)
    low, high = vs[0], vs[int(0.9 * (len(vs) - 1))]
    pad = 0.05 * max(high - low, 1e-6)
    ax.set_ylim(low - pad, high + pad)


def copy_pictures(results: list[RunResult], out_dir: str) -> dict[str, list[str]]:
    copied = {}
    for r in results:
        names = [n for n in PICTURES if os.path.exists(os.path.join(r.spec.run_dir, n))]
        if names:
            os.makedirs(os.path.join(out_dir, r.spec.name), exist_ok=True)
        for n in names:
            shutil.copyfile(os.path.join(r.spec.run_dir, n), os.path.join(out_dir, r.spec.name, n))
        copied[r.spec.name] = names
    return copied


def write_results(grid: Grid, results_path: str, command: str, speed: Optional[str] = None) -> str:
    """Collect every run of the grid into `results_path` (plots and pictures under results/ beside it)."""
    results = [collect_run(r) for r in grid.runs]
    base = os.path.dirname(os.path.abspath(results_path))
    # One folder per grid (named after its out_dir), so pages of different grids keep their own plots.
    assets = os.path.join(base, "results", os.path.basename(os.path.normpath(grid.out_dir)))
    os.makedirs(assets, exist_ok=True)

    def rel(p: str) -> str:
        return os.path.relpath(p, base)

    out = _header(grid, results, command)
    if grid.notes:
        out += ["## What it shows", "", grid.notes, ""]
    by_seed = seed_table(results)
    if by_seed:
        out += ["## Over seeds", "", "Runs that differ only in their seed, as one row: mean ± sample standard "
                "deviation over the finished seeds (n). Epochs to best: the epoch of the best validation -ELBO, "
                "whose checkpoint is evaluated.", "", by_seed, ""]
    paired = paired_table(results)
    if paired:
        out += ["## Paired by seed", "", "Each row's test NLL minus the first row's for the same seed (same "
                "initialisation, data order and initial pseudodata); positive: the first row is better.", "",
                paired, ""]
    cost = cost_ratio(results)
    if cost:
        out += ["## Cost: Exemplar against ByPE", "", "Training wall clock per epoch (steps, validation and "
                "coreset updates), mean over seeds; runs of one grid share the machine alike.", "", cost, ""]
    priors = priors_table(results, _read_json)
    if priors:
        out += ["## The ceiling of any coreset", "", "`bype eval RUN --priors own,uniform,random,kmeans,exemplar`: "
                "the test NLL of each run's networks, fixed, under other priors with the same random numbers "
                "(docs/CORESET.md); gap_closed = (random - own) / (random - exemplar).", "", priors, ""]
    out += ["## Summary", "", summary_table(results), "",
            "## Beside the published numbers", "",
            "Published values are test log-likelihoods from the Exemplar VAE paper (Norouzi et al., 2020; 40-d "
            "latent), marked *published*; ours is minus our test NLL. Differences in budget (the paper trains up "
            "to 4000 epochs with early stopping) and in S make small gaps expected.", "",
            published_table(results), ""]
    plots = plot_curves(results, assets)
    if plots:
        out += ["## Curves", "", f"![validation curves]({rel(plots['val_curves'])})", "",
                "Validation -ELBO (an upper bound on the NLL) against training wall clock; the star is the test NLL "
                "of the best checkpoint, placed where training reached it.", "",
                f"![NLL against wall clock]({rel(plots['nll_vs_time'])})", ""]
    out += coreset_section(results, assets, rel)
    knn = knn_table(results)
    if knn:
        out += ["## kNN accuracy", "", "kNN classification (Euclidean) on encoder means, training split as the "
                "reference set, test split queried.", "", knn, ""]
    out += _speed_section(speed)
    aug = augment_table(results)
    if aug:
        out += ["## Generative data augmentation", "", "MLP 784-1024-1024-10 trained on real images alone and on "
                "real images plus one fresh exemplar-based sample per image per epoch (`bype augment RUN`); "
                "same seed, classifier and number of steps.", "", aug, ""]
    out += _pictures_section(results, copy_pictures(results, assets), assets, rel)
    out += ["## Commands", "", "Each run, as it was started (`RUN_DIR/command.txt`):", "", "```bash"]
    out += [recorded_command(r.spec) for r in results] + ["```", ""]
    with open(results_path, "w") as f:
        f.write("\n".join(out))
    return results_path


def _header(grid: Grid, results: list[RunResult], command: str) -> list[str]:
    finished = sum(r.status == "finished" for r in results)
    source = f" (grid `{_relpath(grid.source)}`)" if grid.source else ""
    return [f"# Results: {grid.title}", "",
            f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from {finished} of "
            f"{len(results)} finished runs under `{grid.out_dir}`{source}. Regenerate it with that command and "
            "`--collect-only`; do not edit it by hand.", "",
            "Test NLL: importance sampling with S samples per test example (the largest S evaluated for the run: "
            "`report.json` or `bype eval RUN --samples S`) on n test images; -ELBO and NLL in nats, lower is "
            "better.", ""]


def _pictures_section(results: list[RunResult], pictures: dict, assets: str, rel) -> list[str]:
    out = ["## Samples and pseudocoresets", "",
           "Algorithm 1 samples (decoder means); for ByPE the pseudodata U sorted by weight and the weights w.", ""]
    for r in results:
        names = pictures.get(r.spec.name) or []
        if names:
            out += [f"### {r.spec.name}", ""]
            out += [f"![{r.spec.name} {n[:-4]}]({rel(os.path.join(assets, r.spec.name, n))})" for n in names]
            out.append("")
    return out


def _speed_section(path: Optional[str]) -> list[str]:
    if not path:
        return []
    report = _read_json(path)
    if report is None:
        print(f"experiment: speed results {path} not found; section left out", flush=True)
        return []
    from bype.bench.speed import format_table

    return ["## Training speed", "", f"From `{report.get('command', 'bype bench speed')}` (`{_relpath(path)}`): "
            "time per epoch = time per step x steps per epoch + per-epoch hook + coreset update / every.", "",
            format_table(report), "",
            "*Published claim* (ByPE-VAE paper): ByPE-VAE trains up to 3 times faster than the Exemplar VAE on the "
            "basic VAE architecture; compare the `x ByPE` column of the exemplar rows.", ""]


