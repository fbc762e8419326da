"""Small shared pieces of the test suite."""
from __future__ import annotations

from bype.config import load_config

# A small but real configuration: real Fashion-MNIST, a subset, a narrow network, short epochs.
TINY = [
    "data.train_limit=1000", "data.eval_limit=200", "model.hidden=64", "model.latent_dim=8",
    "prior.components=20", "train.batch_size=50", "train.warmup_epochs=2", "train.log_every=1000",
    "coreset.every=2", "coreset.steps=5", "coreset.samples=20", "eval.at_end=false", "eval.knn_k=[3]",
]


def tiny_config(tmp_path, *overrides):
    return load_config(None, [f"out_dir={tmp_path}", *TINY, *overrides])
