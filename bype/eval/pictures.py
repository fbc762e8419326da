"""Pictures: sample grids (Algorithm 1), the pseudocoreset with its weights, training curves."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, ncol: Optional[int] = None, pad: int = 2) -> Image.Image:
    """[N, C, H, W] in [0, 1] -> one PIL image, row-major, with a white border between tiles."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.float32)
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    canvas = (canvas * 255).round().astype(np.uint8)
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_grid(images: torch.Tensor, path: str, ncol: Optional[int] = None, scale: int = 2) -> str:
    img = image_grid(images, ncol)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


@torch.no_grad()
def save_samples(model, path: str, n: int = 100, seed: int = 0) -> str:
    """Algorithm 1 samples, shown as the decoder's mean image."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    was = model.training
    model.eval()
    images = model.generate(n, generator=g)
    model.train(was)
    return save_grid(images, path)


def save_coreset(prior, input_shape: tuple, path: str, weights_path: Optional[str] = None) -> Optional[str]:
    """Pseudodata (ByPE, sorted by weight, largest first) or VampPrior pseudo-inputs as an image grid,
    plus a plot of the sorted weights."""
    if prior.kind == "bype":
        order = torch.argsort(prior.w, descending=True)
        images, weights = prior.U[order], prior.w[order]
    elif prior.kind == "vampprior":
        images, weights = prior.pseudo_inputs.detach(), None
    else:
        return None
    save_grid(images.view(-1, *input_shape).cpu(), path)
    if weights is not None and weights_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(np.arange(len(weights)), weights.cpu().numpy(), width=1.0)
        ax.set_xlabel("pseudodata point (sorted)")
        ax.set_ylabel("weight w_m")
        w = weights.double()
        ax.set_title(f"pseudocoreset weights (sum = {float(w.sum()):.0f}, {float(w.min()):.3g} .. {float(w.max()):.3g}, "
                     f"effective number {float(w.sum() ** 2 / (w**2).sum()):.1f} of {len(w)})", fontsize=9)
        fig.tight_layout()
        fig.savefig(weights_path, dpi=100)
        plt.close(fig)
    return path


def save_curves(records: list[dict], path: str, keys=("train_loss", "val_loss")) -> Optional[str]:
    """Loss curves per epoch from the metrics records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "epoch" in r and all(k in r for k in keys)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        ax.plot([r["epoch"] for r in rows], [r[k] for r in rows], label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
