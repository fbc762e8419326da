"""The parts of a generated RESULTS.md that concern seeds and the pseudocoreset: rows aggregated over
seeds (mean and spread), and the coreset's diagnostics over training (docs/CORESET.md says what each is).
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Optional

# Per-update metrics (metrics.jsonl, prefixed coreset_) plotted over training.
DIAGNOSTICS = (("heldout_half_var_after", "held-out ½Var(R) after the update", True),
               ("heldout_ess_after", "held-out ESS of e^R (of S)", False),
               ("w_ess", "effective number of weights (sum w)² / sum w²", False),
               ("u_mean_abs_change", "mean |ΔU| of the update", True))


def mean_spread(values: list[float]) -> str:
    """'mean ± sd (n)', the sample standard deviation over seeds; one value alone as it is."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def seed_table(results: list) -> Optional[str]:
    """One line per grid row (runs that differ only in their seed): test NLL, best validation -ELBO and
    kNN accuracy as mean ± sd over the finished seeds, and each seed's test NLL."""
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(r.spec.group, []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return None
    lines = ["| row | prior | seeds finished | test NLL, mean ± sd (n) | per seed | best val -ELBO | kNN acc (k=5) |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        done = [r for r in runs if "test_nll" in r.evaluation]
        nll = [r.evaluation["test_nll"] for r in done]
        vals = [min(m["val_loss"] for m in r.metrics if "val_loss" in m) for r in runs
                if any("val_loss" in m for m in r.metrics)]
        knn = [100 * r.evaluation["knn_5"] for r in done if "knn_5" in r.evaluation]
        per_seed = ", ".join(f"{r.spec.name}: {r.evaluation['test_nll']:.2f}" for r in done) or "-"
        lines.append(f"| {name} | {runs[0].prior} | {len(done)} of {len(runs)} | {mean_spread(nll)} | {per_seed} "
                     f"| {mean_spread(vals)} | {mean_spread(knn)} |")
    return "\n".join(lines)


def _updates(r) -> list[dict]:
    return [m for m in r.metrics if "coreset_heldout_half_var_after" in m]


def coreset_table(results: list) -> Optional[str]:
    """Per ByPE run: updates, rollbacks, the held-out objective at the first and last update, and the
    weights and pseudodata after the last update."""
    rows = [(r, _updates(r)) for r in results if _updates(r)]
    if not rows:
        return None
    lines = ["| run | updates (rolled back) | held-out ½Var(R): first update before -> last after | ESS of e^R, "
             "last after (of S) | w range after last | w ESS (of M) | mean \\|ΔU\\| per update |",
             "|---|---|---|---|---|---|---|"]
    for r, ups in rows:
        first, last = ups[0], ups[-1]
        m = r.config.get("prior", {}).get("components", "?")
        s = r.config.get("coreset", {}).get("samples") or m
        du = statistics.mean(u["coreset_u_mean_abs_change"] for u in ups)
        rolled = sum(int(u["coreset_rolled_back"]) for u in ups)
        lines.append(f"| {r.spec.name} | {len(ups)} ({rolled}) | {first['coreset_heldout_half_var_before']:.4g} -> "
                     f"{last['coreset_heldout_half_var_after']:.4g} | {last['coreset_heldout_ess_after']:.1f} of {s} "
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

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title, log_scale) in zip(axes.flat, DIAGNOSTICS):
        for r, ups in rows:
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
           "Each update is measured before and after on held-out draws (the same random numbers both times): "
           "½Var(R) of the residual R(z) = sum_n log p(x_n|z) - sum_m w_m log p(u_m|z) (the KL when R is Gaussian, "
           "and the objective an update must lower or be rolled back), the effective sample size of e^R, the "
           "weights' range and effective number, and the mean absolute change of the pseudodata "
           "(docs/CORESET.md).", "", table, ""]
    plot = plot_coreset(results, assets)
    if plot:
        out += [f"![coreset diagnostics]({rel(plot)})", ""]
    return out
