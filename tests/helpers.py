"""Small shared pieces of the test suite."""
from __future__ import annotations

from bype.config import load_config

import kernels

# A small but real configuration: real Fashion-MNIST, a subset, a narrow network, short epochs.
TINY = [
    "data.train_limit=1000", "data.eval_limit=200", "model.hidden=64", "model.latent_dim=8",
    "prior.components=20", "train.batch_size=50", "train.warmup_epochs=2", "train.log_every=1000",
    "coreset.every=2", "coreset.steps=5", "coreset.samples=20", "eval.at_end=false", "eval.knn_k=[3]",
]


def tiny_config(tmp_path, *overrides):
    return load_config(None, [f"out_dir={tmp_path}", *TINY, *overrides])


def triton_skip_reason(load_triton_module) -> str:
    """'' when an op's Triton path can run here (CPU tensors through the interpreter), else why not."""
    import torch

    if not kernels.triton_available():
        return "triton not installed"
    if not kernels.interpreter_enabled():
        return "TRITON_INTERPRET is not 1"
    try:
        load_triton_module(torch.device("cpu"))
    except RuntimeError as e:  # triton imported earlier in this session without the interpreter
        return str(e)
    return ""
