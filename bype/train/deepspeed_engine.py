"""DeepSpeed behind the trainer's engine interface: ZeRO stage 0-2, bf16 / fp16 autocast.

The DeepSpeed config is generated from `train.*` and `dist.*`, with an optional JSON / YAML block
(`dist.deepspeed_config`, see configs/deepspeed/) merged over it. The VAE optimiser stays bype's own,
handed to DeepSpeed as its client optimiser, so a run means the same under every engine.

Choices, and why:
- Mixed precision is DeepSpeed's `torch_autocast`, not its bf16 / fp16 modes. Those cast the
  parameters, while the model feeds fp32 buffers (coreset U, w; the exemplar bank) and fp32 data
  through them in training, validation and the coreset update. Under autocast the parameters and the
  optimiser stay fp32 and only the forward's matmuls run in low precision.
- ZeRO-3 is refused: validation, sampling and the coreset update call the bare module outside the
  engine, where ZeRO-3 leaves empty parameter shards.
- Checkpoints: every rank writes DeepSpeed's own (module + its optimiser partition) under
  RUN_DIR/deepspeed/epochNNNNNN before rank 0 writes last.pt, which records the tag, so last.pt never
  names an incomplete DeepSpeed checkpoint. Older tags are pruned; those of last.pt and last.prev.pt stay.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

from bype.train.checkpoint import CheckpointError, check_zero_world
from bype.config import ConfigError, deep_update, read_yaml_mapping
from bype.train.optim import build_optimizer
from bype.parallel import attach_row_shard

log = logging.getLogger("bype")

CHECKPOINT_DIR = "deepspeed"
_TAG = re.compile(r"^epoch(\d+)$")


class PartitionedNormalizedAdam(torch.optim.Adam):
    """The reference's normalised-gradient Adam when ZeRO-1/2 partitions the optimiser.

    bype gives every parameter tensor its own param group; ZeRO then hands this optimiser, per group,
    one flat tensor: this rank's slice of that parameter (zero-padded). The tensor's gradient norm is the
    root of the slices' squared norms summed over the ranks, so one all-reduce restores exactly the
    per-tensor normalisation of `bype.train.optim.NormalizedAdam`.
    """

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            sq = torch.stack([g.float().pow(2).sum() for g in grads])
            if dist.is_initialized():
                dist.all_reduce(sq)
            for g, s in zip(grads, sq.tolist()):
                if s > 0:
                    g.div_(s ** 0.5)
        return super().step(closure)


def read_block(path: str) -> dict:
    """A DeepSpeed config block, JSON or YAML (YAML reads JSON too)."""
    return read_yaml_mapping(path, "dist.deepspeed_config")


def build_deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config of a run: generated from the bype config, the user's block merged over it."""
    d = cfg.dist
    out = {
        # train.batch_size is the global batch: each rank takes batch_size / world rows of it per step.
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(cfg.train.grad_clip or 0.0),  # DeepSpeed's default would clip at 1.0
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,  # bype's optimisers are torch Adam subclasses, which ZeRO handles
        "steps_per_print": 2**31 - 1,  # bype logs progress itself
        "wall_clock_breakdown": False,
    }
    if d.precision != "fp32":
        out["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[d.precision]}
    if d.deepspeed_config:
        block = read_block(d.deepspeed_config)
        _check_block(block, out, d.deepspeed_config)
        out = deep_update(out, block)
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"dist.zero_stage: ZeRO stage {stage} is not supported (0-2): validation, sampling and "
                          "the coreset update read full parameters outside the engine")
    return out


def _check_block(block: dict, generated: dict, path: str) -> None:
    for key in ("optimizer", "scheduler"):
        if key in block:
            raise ConfigError(f"dist.deepspeed_config: {path} sets '{key}'; the VAE optimiser is bype's "
                              "(train.optimizer, train.lr)")
    for key in ("fp16", "bf16"):
        if isinstance(block.get(key), dict) and block[key].get("enabled"):
            raise ConfigError(f"dist.deepspeed_config: {path} enables '{key}', which casts the parameters that "
                              "fp32 data and coreset buffers pass through; use dist.precision (autocast)")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in block and block[key] != generated[key]:
            raise ConfigError(f"dist.deepspeed_config: {path} sets {key}={block[key]}, but train.batch_size "
                              f"(the global batch) gives {generated[key]}; set train.batch_size instead")


def _ensure_process_group(ctx) -> None:
    """DeepSpeed needs a process group, and the launcher's variables, even in a single process."""
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def _scalar_safe_broadcast():
    """DeepSpeed 0.19 broadcasts the initial parameters as byte views, which fails on 0-dim ones (the
    prior's log-variance): hand it a 1-dim view of those, sharing their storage."""
    from deepspeed.runtime.engine import DeepSpeedEngine as Engine

    original = Engine._broadcast_model

    def broadcast_model(engine):
        scalars = [(p, p.data) for p in engine.module.parameters() if p.dim() == 0]
        for p, data in scalars:
            p.data = data.view(1)
        try:
            original(engine)
        finally:
            for p, data in scalars:
                p.data = data

    Engine._broadcast_model = broadcast_model
    try:
        yield
    finally:
        Engine._broadcast_model = original


class DeepSpeedEngine:
    """`engine(x, idx, beta)`, `backward(loss)`, `step()`, `module`, `state_dict()`, `load_state_dict()`,
    plus `save_checkpoint(epoch)` for DeepSpeed's own sharded checkpoint in the run directory (a collective)."""

    def __init__(self, cfg, model: torch.nn.Module, ctx):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its info lines drown bype's
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")  # DeepSpeed's call
        _ensure_process_group(ctx)
        self.config = build_deepspeed_config(cfg, ctx.world_size)
        self.stage = self.config["zero_optimization"].get("stage", 0)
        self.world_size = ctx.world_size
        self.root = os.path.join(cfg.run_dir, CHECKPOINT_DIR)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p]} for p in params]  # one tensor per group: see PartitionedNormalizedAdam
        if self.stage in (1, 2) and cfg.train.optimizer == "normalized_adam":
            optimizer = PartitionedNormalizedAdam(groups, lr=cfg.train.lr)
        else:
            optimizer = build_optimizer(cfg, groups)
        with _scalar_safe_broadcast():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     config=self.config)
        self.module = model
        attach_row_shard(model, ctx, cfg.dist.shard_prior)
        self.tag = None  # the DeepSpeed checkpoint tag last written or loaded
        log.info("deepspeed: ZeRO stage %d, %s, %d rank(s), micro batch %d", self.stage,
                 "autocast " + self.config["torch_autocast"]["dtype"] if "torch_autocast" in self.config else "fp32",
                 ctx.world_size, self.config["train_micro_batch_size_per_gpu"])
        if cfg.train.compile:  # asked for explicitly (null, the default, stays quiet): say it is not applied
            log.warning("train.compile=true is not applied with dist.engine=deepspeed: the step runs eagerly "
                        "(compiling applies to dist.engine=none and ddp)")

    def __call__(self, x, idx, beta, noise=None):
        return self.engine(x, idx, beta, noise)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # averages gradients over ranks (and scales the loss for fp16)

    def step(self) -> None:
        self.engine.step()  # clips, steps and zeroes the gradients

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int) -> None:
        """Every rank writes its part of DeepSpeed's checkpoint for `epoch` (once, however often called)."""
        tag = f"epoch{epoch:06d}"
        if tag == self.tag:
            return  # best.pt and last.pt of one epoch share it
        if dist.get_rank() == 0:
            self._prune(self.root, keep=2)  # what last.pt and last.prev.pt name; `tag` is newer than both
        dist.barrier()
        self.engine.save_checkpoint(self.root, tag=tag, save_latest=False)  # last.pt, not a 'latest' file, names it
        dist.barrier()
        self.tag = tag

    @staticmethod
    def _prune(root: str, keep: int) -> None:
        if not os.path.isdir(root):
            return
        tags = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _TAG.match(name)))
        for _, name in tags[:-keep]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def state_dict(self) -> dict:
        if self.tag is None:
            raise RuntimeError("DeepSpeedEngine.state_dict: call save_checkpoint first")
        return {"deepspeed_tag": self.tag, "zero_stage": self.stage, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if "deepspeed_tag" not in state:
            raise CheckpointError("the checkpoint was written by dist.engine=ddp/none; resume it with that engine")
        check_zero_world(state, self.world_size, os.path.join(self.root, state["deepspeed_tag"]))
        path, _ = self.engine.load_checkpoint(self.root, tag=state["deepspeed_tag"], load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{self.root}/{state['deepspeed_tag']}: DeepSpeed checkpoint missing or unreadable")
        self.tag = state["deepspeed_tag"]
