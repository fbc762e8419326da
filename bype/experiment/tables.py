"""The parts of a generated RESULTS.md that concern seeds and the pseudocoreset: rows aggregated over
seeds (mean and spread), and the coreset's diagnostics over training (docs/CORESET.md says what each is).
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Optional

# Per-update metrics (metrics.jsonl, prefixed coreset_) plotted over training.
DIAGNOSTICS = (("heldout_half_var_after", "posterior objective: held-out ½Var(R) after the update", True),
               ("heldout_ce_gap_after", "exemplar objective: held-out cross-entropy gap to p_E (nats)", False),
               ("mean_gap_after", "weighted-mean gap ||sum x - sum w u|| / N", False),
               ("w_ess", "effective number of weights (sum w)² / sum w²", False),
               ("u_mean_abs_change", "mean |ΔU| of the update", True))


def mean_spread(values: list[float]) -> str:
    """'mean ± sd (n)', the sample standard deviation over seeds; one value alone as it is."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def _groups(results: list) -> dict[str, list]:
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(r.spec.group, []).append(r)
    return groups


def _seed(r) -> int:
    return int(r.config.get("seed", 0))


def best_epoch(r) -> Optional[int]:
    """The epoch of the best validation -ELBO: the checkpoint that was evaluated."""
    rows = [m for m in r.metrics if "val_loss" in m and "epoch" in m]
    return min(rows, key=lambda m: m["val_loss"])["epoch"] if rows else None


def seconds_per_epoch(r) -> Optional[float]:
    """Training wall clock per epoch (steps, validation and coreset updates)."""
    epochs, seconds = r.report.get("epochs"), r.report.get("train_seconds")
    return seconds / epochs if epochs and seconds else None


def seed_table(results: list) -> Optional[str]:
    """One line per grid row (runs that differ only in their seed): test NLL, best validation -ELBO and
    kNN accuracy as mean ± sd over the finished seeds, each seed's test NLL, the epochs to the best
    checkpoint and the seconds per epoch."""
    groups = _groups(results)
    if all(len(g) == 1 for g in groups.values()):
        return None
    lines = ["| row | prior | seeds finished | test NLL, mean ± sd (n) | per seed | best val -ELBO | epochs to best "
             "| s / epoch | kNN acc (k=5) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        done = [r for r in runs if "test_nll" in r.evaluation]
        nll = [r.evaluation["test_nll"] for r in done]
        vals = [min(m["val_loss"] for m in r.metrics if "val_loss" in m) for r in runs
                if any("val_loss" in m for m in r.metrics)]
        knn = [100 * r.evaluation["knn_5"] for r in done if "knn_5" in r.evaluation]
        best = [float(b) for b in map(best_epoch, done) if b is not None]
        per_epoch = [s for s in map(seconds_per_epoch, done) if s is not None]
        per_seed = ", ".join(f"{r.spec.name}: {r.evaluation['test_nll']:.2f}" for r in done) or "-"
        lines.append(f"| {name} | {runs[0].prior} | {len(done)} of {len(runs)} | {mean_spread(nll)} | {per_seed} "
                     f"| {mean_spread(vals)} | {mean_spread(best)} | {mean_spread(per_epoch)} | {mean_spread(knn)} |")
    return "\n".join(lines)


def paired_table(results: list) -> Optional[str]:
    """Test NLL of every row minus the first row's, seed by seed (the same seed: the same initialisation,
    data order and, for ByPE, initial pseudodata), as mean ± sd over the seeds both finished."""
    groups = _groups(results)
    if len(groups) < 2 or all(len(g) == 1 for g in groups.values()):
        return None
    (ref_name, ref_runs), *others = groups.items()
    ref = {_seed(r): r.evaluation["test_nll"] for r in ref_runs if "test_nll" in r.evaluation}
    lines = [f"| row | minus {ref_name}, mean ± sd (n) | per seed | seeds where {ref_name} is better |",
             "|---|---|---|---|"]
    for name, runs in others:
        diffs = [(_seed(r), r.evaluation["test_nll"] - ref[_seed(r)]) for r in runs
                 if "test_nll" in r.evaluation and _seed(r) in ref]
        per_seed = ", ".join(f"s{x}: {d:+.2f}" for x, d in diffs) or "-"
        wins = sum(d > 0 for _, d in diffs)
        lines.append(f"| {name} | {mean_spread([d for _, d in diffs])} | {per_seed} | {wins} of {len(diffs)} |")
    return "\n".join(lines)


def cost_ratio(results: list) -> Optional[str]:
    """Seconds per epoch of each Exemplar row against each ByPE row (the pitch: Exemplar quality, ByPE cost)."""
    rows = {name: [s for s in map(seconds_per_epoch, runs) if s is not None] for name, runs in _groups(results).items()}
    kinds = {name: runs[0].prior for name, runs in _groups(results).items()}
    pairs = [(e, b) for e in rows if kinds[e] == "exemplar" and rows[e] for b in rows if kinds[b] == "bype" and rows[b]]
    if not pairs:
        return None
    return "\n".join(f"- {e} / {b}: {statistics.mean(rows[e]):.2f} / {statistics.mean(rows[b]):.2f} s per epoch = "
                     f"**{statistics.mean(rows[e]) / statistics.mean(rows[b]):.2f}x**" for e, b in pairs)


def priors_table(results: list, read_json) -> Optional[str]:
    """`bype eval RUN --priors` results (priors.json) of the grid's runs: test NLL per prior, gap_closed."""
    found = [(r, read_json(os.path.join(r.spec.run_dir, "priors.json"))) for r in results]
    found = [(r, p) for r, p in found if p]
    if not found:
        return None
    names = [n for n in ("own", "uniform", "random", "kmeans", "exemplar") if any(n in p["priors"] for _, p in found)]
    lines = ["| run | S, test images | " + " | ".join(names) + " | gap_closed |", "|" + "---|" * (len(names) + 3)]
    for r, p in found:
        cells = [f"{p['priors'][n]['test_nll']:.2f}" if n in p["priors"] else "-" for n in names]
        gap = p.get("gap_closed")
        lines.append(f"| {r.spec.name} | {p['is_samples']}, {p['n_test']} | " + " | ".join(cells)
                     + f" | {'-' if gap is None else f'{gap:.2f}'} |")
    by_row: dict[str, list] = {}
    for r, p in found:
        if p.get("gap_closed") is not None:
            by_row.setdefault(r.spec.group, []).append(p["gap_closed"])
    if by_row:
        lines += ["", "gap_closed over seeds: " + "; ".join(f"{g}: {mean_spread(v)}" for g, v in by_row.items())]
    return "\n".join(lines)


def _updates(r) -> list[dict]:
    return [m for m in r.metrics if "coreset_heldout_half_var_after" in m or "coreset_heldout_ce_after" in m]


def _objective_cells(first: dict, last: dict) -> str:
    if "coreset_heldout_ce_after" in last:
        return (f"exemplar | cross-entropy gap to p_E {first['coreset_heldout_ce_gap_before']:.4g} -> "
                f"{last['coreset_heldout_ce_gap_after']:.4g} nats")
    return (f"posterior | ½Var(R) {first['coreset_heldout_half_var_before']:.4g} -> "
            f"{last['coreset_heldout_half_var_after']:.4g} (ESS {last['coreset_heldout_ess_after']:.1f})")


def coreset_table(results: list) -> Optional[str]:
    """Per ByPE run: updates, rollbacks, its objective's held-out measure at the first update (before) and
    the last (after), the weighted-mean gap, and the weights and pseudodata after the last update."""
    rows = [(r, _updates(r)) for r in results if _updates(r)]
    if not rows:
        return None
    lines = ["| run | updates (rolled back) | objective | held-out: first update before -> last after "
             "| weighted-mean gap, first before -> last after | w range after last | w ESS (of M) "
             "| mean \\|ΔU\\| per update |", "|---|---|---|---|---|---|---|---|"]
    for r, ups in rows:
        first, last = ups[0], ups[-1]
        m = r.config.get("prior", {}).get("components", "?")
        du = statistics.mean(u["coreset_u_mean_abs_change"] for u in ups)
        rolled = sum(int(u["coreset_rolled_back"]) for u in ups)
        gap = (f"{first['coreset_mean_gap_before']:.4g} -> {last['coreset_mean_gap_after']:.4g}"
               if "coreset_mean_gap_before" in first else "-")
        lines.append(f"| {r.spec.name} | {len(ups)} ({rolled}) | {_objective_cells(first, last)} | {gap} "
                     f"| {last['coreset_w_min']:.3g} .. {last['coreset_w_max']:.3g} "
                     f"| {last['coreset_w_ess']:.1f} of {m} | {du:.4f} |")
    return "\n".join(lines)


def plot_coreset(results: list, out_dir: str) -> Optional[str]:
    """The diagnostics of every update over training, one panel each, one line per ByPE run."""
    rows = [(r, _updates(r)) for r in results if _updates(r)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    axes.flat[-1].axis("off")
    for ax, (key, title, log_scale) in zip(axes.flat, DIAGNOSTICS):
        for r, ups in rows:
            ups = [u for u in ups if f"coreset_{key}" in u]
            if not ups:
                continue
            ys = [u[f"coreset_{key}"] for u in ups]
            if log_scale and all(y > 0 and math.isfinite(y) for y in ys):
                ax.set_yscale("log")
            ax.plot([u["epoch"] for u in ups], ys, marker="o", label=r.spec.name)
        ax.set(title=title, xlabel="epoch")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "coreset_diagnostics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def coreset_section(results: list, assets: str, rel) -> list[str]:
    table = coreset_table(results)
    if table is None:
        return []
    out = ["## Pseudocoreset diagnostics over training", "",
           "Each update is measured before and after on held-out draws (the same random numbers both times) by "
           "its own objective, which it must lower or be rolled back: for `posterior` ½Var(R) of the residual "
           "R(z) = sum_n log p(x_n|z) - sum_m w_m log p(u_m|z) (the KL when R is Gaussian) and the effective sample "
           "size of e^R; for `exemplar` the cross-entropy gap to the Exemplar prior (an estimate of "
           "KL(p_E || p_C)). Beside them the weighted-mean gap ||sum x - sum w u|| / N (all the posterior objective "
           "sees for Bernoulli data), the weights' range and effective number, and the mean absolute change of "
           "the pseudodata (docs/CORESET.md).", "", table, ""]
    plot = plot_coreset(results, assets)
    if plot:
        out += [f"![coreset diagnostics]({rel(plot)})", ""]
    return out
