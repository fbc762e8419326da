"""Generative data augmentation: an MLP classifier's test error without and with a trained run's samples.

  bype augment RUN_DIR [--epochs 100] [--train-limit N] [--batch-size 100] [--seed 0] [--lr 1e-3]
                       [--dropout 0] [--checkpoint best|last] [--eval-every 10] [--device auto]

The Exemplar VAE paper's protocol: an MLP 784-1024-1024-10 (ReLU) is trained twice with the same
seed, initialisation, data order and number of steps: on the real training images alone, and on each real
minibatch together with one fresh generated image per real image. A generated image comes from the
exemplar-based transition of its real image x: z ~ r(z|x) = N(mu(x), s2 I) with the prior's shared variance
s2 (ByPE, Exemplar; q(z|x) for priors without one), decoded to the likelihood's mean, and keeps the label of
x. Augmentations are drawn afresh every epoch. Writes RUN_DIR/augment.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("bype")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a trained run (bype train)")
    p.add_argument("--epochs", type=int, default=100, help="classifier epochs (the protocol: 100)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--batch-size", type=int, default=100, help="real images per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden layer")
    p.add_argument("--hidden", type=int, default=1024, help="width of the two hidden layers")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--eval-every", type=int, default=10, help="epochs between test-error evaluations (and the last)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


class Classifier(nn.Sequential):
    """MLP D-1024-1024-classes with ReLU and optional dropout."""

    def __init__(self, d_in: int, n_classes: int = 10, hidden: int = 1024, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for d in (d_in, hidden):
            layers += [nn.Linear(d, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        super().__init__(*layers, nn.Linear(hidden, n_classes))


class ExemplarAugmenter:
    """Decodes one new image per real image x from z ~ r(z|x) (see the module doc)."""

    def __init__(self, model):
        self.model = model
        self.shared_variance = hasattr(model.prior, "log_var")

    def describe(self) -> str:
        if self.shared_variance:
            return f"z ~ N(mu(x), s2 I), prior's shared s2 = {self.model.prior.log_var.detach().exp().item():.4g}"
        return f"z ~ q(z|x) ({self.model.prior.kind} prior has no shared component variance)"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flattened grey levels [B, D] -> generated images [B, D] in the data domain."""
        mu, logvar = self.model.encode_flat(x)
        if self.shared_variance:
            logvar = self.model.prior.log_var.expand_as(mu)
        z = mu + torch.randn(mu.shape, generator=generator, device=mu.device) * torch.exp(0.5 * logvar)
        return self.model.likelihood.mean(self.model.decode_params(z, generator)).reshape(x.shape[0], -1)


@torch.no_grad()
def test_error(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    was = clf.training
    clf.eval()
    wrong = sum(int((clf(xb).argmax(1) != yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    clf.train(was)
    return wrong / len(y)


def train_classifier(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                     epochs: int, batch_size: int, lr: float, seed: int, hidden: int = 1024, dropout: float = 0.0,
                     augment: Optional[Callable] = None, eval_every: int = 10, label: str = "real") -> dict:
    """Train the MLP on (x, y) [N, D] (plus `augment(x_batch, generator)` images with the same labels) and
    return its final test error and a short history. Same seed: same initialisation and data order."""
    torch.manual_seed(seed)
    dev = x.device
    n_classes = int(max(y.max(), y_test.max())) + 1
    clf = Classifier(x.shape[1], n_classes, hidden, dropout).to(dev)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)  # the augmentations' own stream
    steps_per_epoch = max(1, len(x) // batch_size)
    history, t0 = [], time.time()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(dev)
        total = 0.0
        for step in range(steps_per_epoch):
            rows = order[step * batch_size:(step + 1) * batch_size]
            xb, yb = x[rows], y[rows]
            if augment is not None:
                xb, yb = torch.cat([xb, augment(xb, gen)]), torch.cat([yb, yb])
            loss = F.cross_entropy(clf(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        record = {"epoch": epoch, "train_loss": total / steps_per_epoch}
        if epoch % eval_every == 0 or epoch == epochs:
            record["test_error"] = test_error(clf, x_test, y_test)
        history.append(record)
        per_epoch = (time.time() - t0) / epoch
        shown = f", test error {100 * record['test_error']:.2f}%" if "test_error" in record else ""
        log.info("augment [%s] epoch %d/%d: loss %.4f%s, %.1f s/epoch, ETA %.0fs", label, epoch, epochs,
                 record["train_loss"], shown, per_epoch, per_epoch * (epochs - epoch))
    return {"test_error": history[-1]["test_error"], "final_train_loss": history[-1]["train_loss"],
            "steps": steps_per_epoch * epochs, "seconds": round(time.time() - t0, 2), "history": history}


def save_pairs(augmenter: ExemplarAugmenter, x: torch.Tensor, path: str, input_shape: tuple) -> str:
    """Real images (odd rows) above one augmentation each (even rows): a visual check of the transition."""
    from bype.eval.pictures import save_grid

    gen = torch.Generator(device=x.device).manual_seed(0)
    fake = augmenter(x, gen)
    ncol = 8
    rows = []
    for start in range(0, len(x), ncol):
        rows += [x[start:start + ncol], fake[start:start + ncol]]
    return save_grid(torch.cat(rows).view(-1, *input_shape).cpu(), path, ncol=ncol)


def _device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(requested)


def run(args) -> int:
    from bype.train.metrics import setup_logging
    from bype.train.loop import load_trained

    for name in ("epochs", "batch_size", "eval_every", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.train_limit is not None and args.train_limit < args.batch_size:
        raise ValueError(f"--train-limit: {args.train_limit} is smaller than --batch-size {args.batch_size}")
    setup_logging()
    dev = _device(args.device)
    cfg, data, model = load_trained(args.run_dir, args.checkpoint)
    model.to(dev)
    train = data.train_split().head(args.train_limit)
    x, y = train.floats().to(dev), train.y.to(dev)
    x_test, y_test = data.test.floats().to(dev), data.test.y.to(dev)
    augmenter = ExemplarAugmenter(model)
    log.info("augment: %s (%s prior, %s checkpoint), %d train / %d test images, %d epochs, %s", args.run_dir,
             cfg.prior.kind, args.checkpoint, len(x), len(x_test), args.epochs, augmenter.describe())

    pairs = save_pairs(augmenter, x[:32], os.path.join(args.run_dir, "augment_samples.png"), model.input_shape)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, hidden=args.hidden,
                  dropout=args.dropout, eval_every=args.eval_every)
    real = train_classifier(x, y, x_test, y_test, label="real", **common)
    aug = train_classifier(x, y, x_test, y_test, augment=augmenter, label="real+generated", **common)

    report = {
        "run_dir": args.run_dir, "checkpoint": args.checkpoint, "prior": cfg.prior.kind, "arch": cfg.model.arch,
        "dataset": cfg.data.dataset, "error_real": real["test_error"], "error_augmented": aug["test_error"],
        "epochs": args.epochs, "batch_size": args.batch_size, "steps": real["steps"], "seed": args.seed,
        "lr": args.lr, "dropout": args.dropout, "optimizer": "Adam",
        "classifier": f"MLP {x.shape[1]}-{args.hidden}-{args.hidden}-10, ReLU",
        "augmentation": "one fresh image per real image per epoch: " + augmenter.describe()
                        + ", decoded to the likelihood mean, label of x",
        "n_train": len(x), "n_test": len(x_test), "device": str(dev), "pairs_png": pairs,
        "real": real, "augmented": aug,
    }
    out = os.path.join(args.run_dir, "augment.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"test error: real only {100 * real['test_error']:.2f}%, real + generated {100 * aug['test_error']:.2f}%")
    print(f"written: {out}")
    return 0
