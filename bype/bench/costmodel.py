"""The data-parallel cost model's predictions: step time and parallel efficiency for W = 1..64 ranks.

  bype bench costmodel [--world 1,2,4,8,16,32,64] [--precision fp32|bf16] [--out DIR] [--plot FILE]

Profiles two models in this process (FlopCounterMode and an operator count on a few random rows, scaled:
bype.bench.perf.flops.model_profile): the Fashion-MNIST VAE and the CelebA ConvHVAE, both with the ByPE
prior (M = 500) at the reference's batch of 100. Then applies the formula of bype.bench.perf.cost_model with
an H100 node's figures (8 GPUs on NVLink, InfiniBand between nodes) for the prior's encodings sharded
(this design) and replicated on every rank (the design before it), at a fixed global batch of 100 (strong
scaling) and at 100 rows per rank (weak scaling). Writes DIR/costmodel.json, DIR/costmodel.md and a plot.
"""
from __future__ import annotations

import argparse
import os

from bype.bench._report import write_report

MODELS = {"Fashion-MNIST VAE": ("configs/fashion-mnist/vae-bype.yaml", (1, 28, 28)),
          "CelebA ConvHVAE": ("configs/celeba/convhvae-bype.yaml", (3, 64, 64))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", default="1,2,4,8,16,32,64", help="comma-separated rank counts")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the H100's peak used")
    p.add_argument("--batch-size", type=int, default=100, help="global batch (strong) / rows per rank (weak)")
    p.add_argument("--out", default="runs/bench/costmodel", help="directory for costmodel.json / costmodel.md")
    p.add_argument("--plot", default=None, help="the efficiency plot (default DIR/costmodel.png)")


def profiles(batch: int) -> dict:
    from bype.config import load_config
    from bype.bench.perf.flops import model_profile

    return {name: model_profile(load_config(path, []), shape, batch) for name, (path, shape) in MODELS.items()}


def predictions(profs: dict, dev, worlds: list[int]) -> list[dict]:
    from bype.bench.perf.cost_model import efficiency, predict

    rows = []
    for name, prof in profs.items():
        for w in worlds:
            row = {"model": name, "world": w}
            for sharded in (True, False):
                tag = "sharded" if sharded else "replicated"
                for weak in (False, True):
                    kind = "weak" if weak else "strong"
                    p = predict(prof, dev, w, sharded, weak)
                    row[f"{kind}_{tag}_ms"] = 1e3 * p["t_step"]
                    row[f"{kind}_{tag}_eff"] = efficiency(prof, dev, w, sharded, weak)
                    if sharded and not weak:
                        row.update({f"{k}_ms": 1e3 * p[k] for k in ("t_compute", "t_launch", "t_opt", "t_comm")})
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | W | strong: step ms sharded / replicated | efficiency sharded / replicated | "
             "compute / launch / optimiser / comm ms (sharded) | weak: step ms sharded / replicated | "
             "samples/s vs 1 rank, sharded / replicated |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['world']} | {r['strong_sharded_ms']:.2f} / {r['strong_replicated_ms']:.2f} | "
            f"{r['strong_sharded_eff']:.2f} / {r['strong_replicated_eff']:.2f} | "
            f"{r['t_compute_ms']:.2f} / {r['t_launch_ms']:.2f} / {r['t_opt_ms']:.3f} / {r['t_comm_ms']:.3f} | "
            f"{r['weak_sharded_ms']:.2f} / {r['weak_replicated_ms']:.2f} | "
            f"{r['weak_sharded_eff'] * r['world']:.1f}x / {r['weak_replicated_eff'] * r['world']:.1f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("strong", "weak")):
        for model, colour in zip(MODELS, ("tab:blue", "tab:red")):
            mine = [r for r in rows if r["model"] == model]
            w = [r["world"] for r in mine]
            for tag, style in (("sharded", "o-"), ("replicated", "s--")):
                ax.plot(w, [r[f"{kind}_{tag}_eff"] for r in mine], style, color=colour,
                        alpha=1.0 if tag == "sharded" else 0.6, label=f"{model}, {tag} prior")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks W (8 per node)")
        ax.set_title("fixed global batch 100: t(1) / (W t(W))" if kind == "strong"
                     else "100 rows per rank: samples/s per rank vs 1 rank")
        ax.axvline(8, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted parallel efficiency")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args) -> int:
    from bype.bench.perf.cost_model import H100_BF16, H100_FP32, device_dict

    worlds = [int(w) for w in args.world.split(",")]
    dev = H100_FP32 if args.precision == "fp32" else H100_BF16
    profs = profiles(args.batch_size)
    rows = predictions(profs, dev, worlds)
    os.makedirs(args.out, exist_ok=True)
    png = args.plot or os.path.join(args.out, "costmodel.png")
    plot(rows, png, f"cost model, {dev.name}, ByPE prior M = 500 (bype bench costmodel)")
    write_report(args.out, "costmodel", {"device": device_dict(dev), "profiles": profs, "rows": rows,
                                         "plot": png}, table(rows))
    return 0
