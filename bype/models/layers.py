"""Gated layers of the reference architectures: h(x) * sigmoid(g(x))."""
from __future__ import annotations

import torch
from torch import nn


class GatedDense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.h = nn.Linear(n_in, n_out)
        self.g = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.h = nn.Conv2d(c_in, c_out, kernel, stride, padding)
        self.g = nn.Conv2d(c_in, c_out, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def gated_mlp(n_in: int, hidden: int, depth: int = 2) -> nn.Sequential:
    layers = [GatedDense(n_in if i == 0 else hidden, hidden) for i in range(depth)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform weights, zero biases, as the reference initialises its gated layers."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
