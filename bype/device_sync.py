"""Waiting for a device's queued work before reading a clock (benchmarks, cost estimates)."""
from __future__ import annotations

import torch


def synchronize(device) -> None:
    """Block until the work queued on ``device`` is done: CUDA kernels run asynchronously; CPU work is
    finished when the call that issued it returns, so there is nothing to wait for."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
