"""Optimisers for the VAE parameters."""
from __future__ import annotations

import torch


class NormalizedAdam(torch.optim.Adam):
    """Adam on gradients divided by their L2 norm, tensor by tensor (the reference's optimiser).

    Normalising makes the step size independent of the gradient scale, which the reference relies on
    with its 5e-4 learning rate across data sets and priors.
    """

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    norm = p.grad.norm()
                    if norm > 0:
                        p.grad.div_(norm)
        return super().step(closure)


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    cls = NormalizedAdam if cfg.train.optimizer == "normalized_adam" else torch.optim.Adam
    return cls(params, lr=cfg.train.lr)
