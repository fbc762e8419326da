"""The training loop: one readable path for a single process, DDP and DeepSpeed.

Per epoch: minibatch steps on the beta-ELBO (KL warm-up), the pseudocoreset update every k epochs
(ByPE), validation, checkpoints (`last` every epoch, `best` on improvement), early stopping after the
warm-up. At the end the best model is evaluated on the test set and pictures are written.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from typing import Optional

import numpy as np
import torch
import yaml

from bype.train import checkpoint
from bype.config import Config, config_from_dict, to_dict
from bype.data import DataBundle, device_batches, load_data
from bype.parallel.process_group import DistContext, all_reduce_sum, barrier, broadcast, check_replicated, init_distributed
from bype.train.engines import build_engine
from bype.train.cost_estimate import estimate_costs
from bype.eval.evaluate import evaluate, validation_loss
from bype.train.metrics import MetricsWriter, Progress, read_metrics, setup_logging
from bype.models import build_model
from bype.models.noise import RowNoise
from bype.train.optim import set_learning_rate
from bype.train.preflight import check_start
from bype.atomic import write_text_atomic
from bype.train.rundir import RunDirectory
from bype.eval.pictures import save_coreset, save_curves, save_samples
from bype.train.step_stats import EpochStats

log = logging.getLogger("bype")
BUDGET_CHECK_STEPS = 10  # how often a single process checks the wall-clock budget (DDP: every log line)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_run_config(run_dir: str, overrides: Optional[list[str]] = None) -> Config:
    """The resolved config saved in a run directory, with optional dotted overrides on top."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f), overrides)


def load_trained(run_dir: str, which: str = "best"):
    """(cfg, data, model) of a trained run: its saved config and data, the `which` checkpoint
    ("best" or "last") loaded on CPU, the model in eval mode and the global RNG seeded by cfg.seed."""
    cfg = load_run_config(run_dir)
    data = load_data(cfg)
    bank = data.train_split().x.flatten(1) if cfg.prior.kind == "exemplar" else None
    model = build_model(cfg, data.input_shape, bank)
    path = os.path.join(run_dir, f"{which}.pt")
    checkpoint.load_module_state(model, checkpoint.load(path)["model"], path)
    model.eval()
    torch.manual_seed(cfg.seed)
    return cfg, data, model


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, ctx: Optional[DistContext] = None):
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg)
        setup_logging(self.ctx.rank)
        self.run_dir = cfg.run_dir
        # run directory, world size and data sizes, one line each; nothing is written before begin()
        check_start(cfg, resume, self.ctx.world_size)
        self.rundir = RunDirectory(self.run_dir, self.ctx.is_main)
        seed_everything(cfg.seed)  # the same seed on every rank: identical initialisation everywhere

        self.data: DataBundle = load_data(cfg, self.ctx.rank, self.ctx.world_size)
        bank = self.data.train_split().x.flatten(1) if cfg.prior.kind == "exemplar" else None
        self.model = build_model(cfg, self.data.input_shape, bank).to(self.ctx.device)
        if self.model.prior.n_components:
            rows = self.data.init_rows(self.model.prior.n_components, torch.Generator().manual_seed(cfg.seed))
            self.model.prior.init_from_data(rows.to(self.ctx.device), self.data.n_train)
        self.engine = build_engine(cfg, self.model, self.ctx)
        self.coreset = self._build_coreset()

        self.epoch = 0  # epochs completed
        self.step = 0
        self.best_val = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.stopped_early = False
        if resume:
            self._restore(os.path.join(self.run_dir, "last.pt"))
        check_replicated(self._replicated(start=True), "model and RNG after " + ("resume" if resume else "start-up"))
        self.rundir.begin(to_dict(cfg), self.epoch)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.ctx.is_main)
        log.info("run %s: %s prior, %s arch, N=%d, %d steps/epoch, %d rank(s) on %s, kernels impl=%s",
                 self.run_dir, cfg.prior.kind, cfg.model.arch, self.data.n_train, len(self.data.train_loader),
                 self.ctx.world_size, self.ctx.device, self._kernel_impl())
        self.cost = estimate_costs(self) if cfg.train.cost_estimate else None  # predicted epoch / update times

    # --- set-up -------------------------------------------------------------------------------
    def _build_coreset(self):
        if self.cfg.prior.kind != "bype":
            return None
        from bype.coreset import PseudocoresetOptimizer

        return PseudocoresetOptimizer.from_config(self.cfg, self.model, self.data)

    def _kernel_impl(self) -> str:
        import kernels

        return kernels.resolve_impl(torch.empty(0, device=self.ctx.device), "auto")

    # --- checkpoints --------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "engine": self.engine.state_dict(),
            "coreset": self.coreset.state_dict() if self.coreset is not None else None,
            "rng": checkpoint.rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "train_seconds": self.train_seconds,
            "stopped_early": self.stopped_early,
            "config": to_dict(self.cfg),
        }

    def _replicated(self, start: bool = False) -> dict:
        """State every rank must hold bit for bit: the prior's U, w and log-variance (the coreset); at
        start-up also the whole model and the global RNG (it draws the Exemplar prior's subsets)."""
        prior = self.model.prior
        out = {k: getattr(prior, k) for k in ("U", "w", "log_var") if hasattr(prior, k)}
        if start:
            out.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        if start or prior.kind == "exemplar":
            out["rng.torch"] = torch.get_rng_state()
            if self.ctx.device.type == "cuda":
                out["rng.cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        return out

    def save(self, name: str) -> None:
        self.engine.save_checkpoint(self.epoch)  # every rank; DeepSpeed's sharded state, before last.pt names it
        if self.ctx.is_main:
            checkpoint.save(self._state(), os.path.join(self.run_dir, name))
        barrier()

    def _restore(self, path: str) -> None:
        state = checkpoint.load(path, map_location=self.ctx.device)
        checkpoint.load_module_state(self.model, state["model"], path)
        self.engine.load_state_dict(state["engine"])
        replaced = set_learning_rate(self.engine.optimizer, self.cfg.train.lr) - {self.cfg.train.lr}
        if replaced:
            log.info("train.lr=%g replaces the checkpoint's %s", self.cfg.train.lr,
                     ", ".join(f"{x:g}" for x in sorted(replaced)))
        if self.coreset is not None and state.get("coreset") is not None:
            self.coreset.load_state_dict(state["coreset"])
        checkpoint.set_rng_state(state["rng"])
        for key in ("epoch", "step", "best_val", "best_epoch", "bad_epochs", "train_seconds", "stopped_early"):
            setattr(self, key, state[key])
        log.info("resumed %s at epoch %d (step %d)", path, self.epoch, self.step)

    # --- training -----------------------------------------------------------------------------
    def beta(self, epoch: int) -> float:
        w = self.cfg.train.warmup_epochs
        return 1.0 if w == 0 else min(1.0, epoch / w)

    def _over_budget(self, epoch_start: float, budget: float) -> bool:
        """Rank 0's clock decides for every rank, so all of them stop after the same step."""
        over = self.train_seconds + time.time() - epoch_start > budget
        if not self.ctx.distributed:
            return over  # decided on the host: no device round trip
        return bool(broadcast(torch.tensor(float(over), device=self.ctx.device)).item())

    def train_epoch(self, epoch: int, budget: float = math.inf) -> dict:
        """Run epoch `epoch` (1-based). A wall-clock `budget` (seconds of training, all epochs) that runs
        out mid-epoch ends the epoch early: slow priors (Exemplar: minutes per epoch) still stop on time."""
        cfg, model = self.cfg, self.model
        model.train()
        model.prior.on_epoch_start(model)
        beta = self.beta(epoch)
        loader = self.data.train_loader
        bar = Progress(len(loader), f"epoch {epoch}", cfg.train.log_every, enabled=self.ctx.is_main)
        epoch_stats = EpochStats(("loss", "rec", "kl"), self.ctx.device, cfg.train.log_every, len(loader),
                                 cfg.train.sync_debug, f"epoch {epoch} ")  # read every log_every steps only
        n = 0
        profiler = self._profiler() if cfg.train.profile and epoch == self.epoch + 1 else None
        # Under DDP the budget check is a collective read by the host: only at log lines, where the host reads anyway.
        check_every = cfg.train.log_every if self.ctx.distributed else BUDGET_CHECK_STEPS
        t0 = time.time()
        for i, (x, _, idx) in enumerate(device_batches(loader, epoch, self.ctx.device)):
            noise = RowNoise(cfg.seed, epoch, i, self.ctx.rank, self.ctx.world_size)
            x = model.preprocess(x, noise)
            loss, stats = self.engine(x, idx, beta, noise)
            self.engine.backward(loss)
            self.engine.step()
            postfix = epoch_stats.add(loss, stats, i)  # raises at a log line if a loss was not finite
            self.step += 1
            n += 1
            bar.update(1, **postfix)
            if profiler is not None:
                profiler.step()
            if budget < math.inf and n % check_every == 0 and self._over_budget(t0, budget):
                log.info("time budget reached after %d of %d steps of epoch %d", n, len(loader), epoch)
                break
        sums = epoch_stats.close()
        bar.close()
        if profiler is not None:
            profiler.__exit__(None, None, None)
        step_seconds = time.time() - t0
        # Each rank saw its rows of every global batch: average over ranks for the global batch's loss.
        totals = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=self.ctx.device))
        sums = dict(zip(sums, (totals / self.ctx.world_size).tolist()))
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items()} | {
            "beta": beta, "steps": n, "step_seconds": round(step_seconds, 3)}

    def _profiler(self):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.ctx.device.type == "cuda" else [])
        prof = profile(activities=acts, schedule=schedule(wait=2, warmup=2, active=5, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(os.path.join(self.run_dir, "profile")),
                       record_shapes=True)
        prof.__enter__()
        log.info("profiling steps 5-9 into %s/profile", self.run_dir)
        return prof

    def fit(self) -> dict:
        cfg = self.cfg
        budget = cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
        while self.epoch < cfg.train.epochs and not self.stopped_early and self.train_seconds < budget:
            epoch = self.epoch + 1
            t0 = time.time()
            record = {"epoch": epoch, **self.train_epoch(epoch, budget)}
            if self.coreset is not None and self.coreset.due(epoch):
                record.update({f"coreset_{k}": v for k, v in self.coreset.update(epoch).items()})
                check_replicated(self._replicated(), f"coreset after the update of epoch {epoch}")
            elif self.model.prior.kind == "exemplar":
                check_replicated(self._replicated(), f"exemplar-subset RNG after epoch {epoch}")
            val = validation_loss(self.model, self.data.val, ctx=self.ctx, memory_mb=cfg.eval.memory_mb)  # sharded
            record.update({f"val_{k}": v for k, v in val.items()})
            # Rank 0's clock for everyone: a time budget must stop all ranks after the same epoch.
            seconds = broadcast(torch.tensor(time.time() - t0, dtype=torch.float64, device=self.ctx.device)).item()
            self.train_seconds += seconds
            self.epoch = epoch
            record.update(step=self.step, epoch_seconds=round(seconds, 3),
                          samples_per_s=round(record["steps"] * cfg.train.batch_size / seconds, 1),
                          train_seconds=round(self.train_seconds, 2))
            if hasattr(self.model.prior, "log_var"):
                record["prior_log_var"] = self.model.prior.log_var.item()
            improved = val["loss"] < self.best_val
            if improved:
                self.best_val, self.best_epoch, self.bad_epochs = val["loss"], epoch, 0
            elif epoch > cfg.train.warmup_epochs:
                self.bad_epochs += 1
                self.stopped_early = self.bad_epochs >= cfg.train.patience
            self.metrics.write(record, step=epoch)
            log.info("epoch %d: train %.2f val %.2f (best %.2f @%d) %.1fs %s", epoch, record["train_loss"],
                     val["loss"], self.best_val, self.best_epoch, seconds,
                     f"coreset held-out ½Var(R) {record['coreset_heldout_half_var_after']:.3g}" if "coreset_heldout_half_var_after" in record else "")
            if improved:
                self.save("best.pt")
            self.save("last.pt")
        reason = "early stopping" if self.stopped_early else (
            "time budget" if self.train_seconds >= budget else "epoch limit")
        log.info("training finished after %d epochs (%s), %.1f s", self.epoch, reason, self.train_seconds)
        return {"epochs": self.epoch, "stop_reason": reason, "best_epoch": self.best_epoch,
                "best_val_loss": self.best_val, "train_seconds": round(self.train_seconds, 2)}

    # --- the end of a run ---------------------------------------------------------------------
    def finalize(self, summary: dict) -> Optional[dict]:
        """Evaluate the best model on the test set and write report.json and the pictures (rank 0)."""
        cfg = self.cfg
        best = os.path.join(self.run_dir, "best.pt")
        if os.path.exists(best):
            checkpoint.load_module_state(self.model, checkpoint.load(best, self.ctx.device)["model"], best)
        report = dict(summary, name=cfg.name, prior=cfg.prior.kind, arch=cfg.model.arch,
                      dataset=cfg.data.dataset, n_train=self.data.n_train, world_size=self.ctx.world_size)
        if cfg.eval.at_end:  # every rank evaluates its slice of the test set
            log.info("evaluating the best model (epoch %d) on %d test examples, S=%d", self.best_epoch,
                     len(self.data.test), cfg.eval.is_samples)
            report.update(evaluate(self.model, self.data.test, self.data.train_split(), cfg.eval.is_samples,
                                   cfg.eval.is_batch, cfg.eval.knn_k, log=log.info, ctx=self.ctx,
                                   memory_mb=cfg.eval.memory_mb))
        if not self.ctx.is_main:
            barrier()
            return None
        report.update(write_pictures(self.model, self.run_dir, cfg.eval.n_samples_grid, cfg.seed))
        write_text_atomic(os.path.join(self.run_dir, "report.json"), json.dumps(report, indent=2))
        self.metrics.close()
        barrier()
        return report


def write_pictures(model, run_dir: str, n_samples: int, seed: int) -> dict:
    out = {"samples_png": save_samples(model, os.path.join(run_dir, "samples.png"), n_samples, seed)}
    coreset = save_coreset(model.prior, model.input_shape, os.path.join(run_dir, "coreset.png"),
                           os.path.join(run_dir, "coreset_weights.png"))
    if coreset:
        out["coreset_png"] = coreset
    curves = save_curves(read_metrics(run_dir), os.path.join(run_dir, "curves.png"))
    if curves:
        out["curves_png"] = curves
    return out


def train(cfg: Config, resume: bool = False) -> Optional[dict]:
    trainer = Trainer(cfg, resume=resume)
    with trainer.rundir.guard():  # a failure before the first checkpoint leaves the directory as it was
        return trainer.finalize(trainer.fit())
