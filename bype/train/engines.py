"""How a training step is executed: one process, DDP, or DeepSpeed, behind one small interface.

`engine(x, idx, beta)` runs the model's forward (the loss) through the wrapper that synchronises
gradients; `engine.backward(loss)` and `engine.step()` do the rest; `engine.module` is the bare model.
The local / DDP engine runs that forward under bf16 autocast with `dist.precision=bf16`, and through
torch.compile as `train.compile` says (bype/train/compiled_loss.py).
`state_dict()` / `load_state_dict()` carry the optimiser inside the trainer's checkpoint;
`save_checkpoint(epoch)` (every rank, before rank 0 writes that checkpoint) is where an engine with
sharded state writes it (DeepSpeed); here it has nothing to do.
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from bype.train.compiled_loss import CompiledLoss, plan_compile
from bype.train.optim import build_optimizer
from bype.parallel import attach_row_shard

log = logging.getLogger("bype")


class LocalEngine:
    """A single process, or DDP when `ddp=True` (gradients all-reduced in backward)."""

    def __init__(self, cfg, model: nn.Module, ctx, ddp: bool = False):
        self.module = model
        wrap = None  # DDP around the model (or around the compiled model)
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            dev = [ctx.device.index] if ctx.device.type == "cuda" else None
            # Buffers (the coreset U, w; the exemplar bank) are kept in sync explicitly, never broadcast per step.
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
                inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False}

            def ddp_wrap(module):
                return DistributedDataParallel(module, device_ids=dev, **no_sync)

            wrap = ddp_wrap
            attach_row_shard(model, ctx, cfg.dist.shard_prior)
        self.optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        self.grad_clip = cfg.train.grad_clip
        # Autocast: matmuls in bf16, parameters, optimiser and the model's heads and losses in fp32.
        self.autocast = dict(device_type=ctx.device.type, dtype=torch.bfloat16,
                             enabled=cfg.dist.precision == "bf16")
        mode, why = plan_compile(cfg, ctx.device)
        if mode is not None:  # DDP goes around the compiled model (bype/train/compiled_loss.py)
            self.loss = CompiledLoss(model, mode, fullgraph=cfg.prior.kind != "exemplar", wrap=wrap)
        else:
            self.loss = wrap(model) if wrap is not None else model
        log.info("engine: %s, %s, torch.compile %s", "DDP" if ddp else "one process",
                 "bf16 autocast" if self.autocast["enabled"] else "fp32", f"on ({why})" if mode else f"off ({why})")

    def __call__(self, x, idx, beta, noise=None):
        with torch.autocast(**self.autocast):
            return self.loss(x, idx, beta, noise)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()

    def save_checkpoint(self, epoch: int) -> None:
        """The whole optimiser state fits in the trainer's checkpoint (`state_dict`)."""

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:
            from bype.train.checkpoint import CheckpointError

            raise CheckpointError("the checkpoint was written by dist.engine=deepspeed; resume it with that engine")
        self.optimizer.load_state_dict(state["optimizer"])


def build_engine(cfg, model: nn.Module, ctx):
    if cfg.dist.engine == "deepspeed":
        from bype.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, ctx)
    return LocalEngine(cfg, model, ctx, ddp=cfg.dist.engine == "ddp" and ctx.distributed)
