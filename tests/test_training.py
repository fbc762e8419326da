"""End-to-end behaviour of the trainer on real Fashion-MNIST (small subsets, real pipeline)."""
import json
import os

import pytest
import torch

from bype.train import checkpoint
from bype.eval.evaluate import importance_sampled_ll, model_inputs
from bype.train.loop import Trainer, load_run_config, train
from tests.helpers import tiny_config


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("prior", ["gaussian", "bype"])
def test_short_run_lowers_validation_loss(tmp_path, fmnist_root, prior):
    cfg = tiny_config(tmp_path, f"prior.kind={prior}", "train.epochs=4", "name=run")
    train(cfg)
    records = read_metrics(cfg.run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 5
    for name in ("last.pt", "best.pt", "config.yaml", "report.json", "samples.png"):
        assert os.path.exists(os.path.join(cfg.run_dir, name)), name


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prior", ["bype", "exemplar"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, fmnist_root, prior):
    extra = [f"prior.kind={prior}", "prior.exemplar.subset=300"]
    full = tiny_config(tmp_path, *extra, "train.epochs=4", "name=full")
    Trainer(full).fit()
    reference = checkpoint.load(os.path.join(full.run_dir, "last.pt"))

    half = tiny_config(tmp_path, *extra, "train.epochs=2", "name=half")
    Trainer(half).fit()
    resumed_cfg = load_run_config(half.run_dir, ["train.epochs=4"])
    resumed = Trainer(resumed_cfg, resume=True)
    assert resumed.epoch == 2
    resumed.fit()
    got = checkpoint.load(os.path.join(half.run_dir, "last.pt"))
    assert got["epoch"] == reference["epoch"] == 4
    for key, value in reference["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert [r["epoch"] for r in read_metrics(half.run_dir)] == [1, 2, 3, 4]
    assert [r["val_loss"] for r in read_metrics(half.run_dir)] == [r["val_loss"] for r in read_metrics(full.run_dir)]


def test_resume_applies_a_learning_rate_given_on_the_command_line(tmp_path, fmnist_root):
    half = tiny_config(tmp_path, "prior.kind=gaussian", "train.epochs=1", "train.lr=1e-3", "name=lr")
    Trainer(half).fit()
    kept = Trainer(load_run_config(half.run_dir, ["train.epochs=2"]), resume=True)
    assert {g["lr"] for g in kept.engine.optimizer.param_groups} == {1e-3}
    lowered = Trainer(load_run_config(half.run_dir, ["train.epochs=2", "train.lr=2e-4"]), resume=True)
    assert {g["lr"] for g in lowered.engine.optimizer.param_groups} == {2e-4}
    assert lowered.engine.optimizer.state  # the Adam moments still came from the checkpoint


def test_corrupt_checkpoint_gives_clear_error_and_previous_survives(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path, "prior.kind=gaussian", "train.epochs=2", "name=c")
    Trainer(cfg).fit()
    last = os.path.join(cfg.run_dir, "last.pt")
    prev = checkpoint.previous_path(last)
    assert checkpoint.load(prev)["epoch"] == 1
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"last.pt: corrupt or truncated checkpoint .*last.prev.pt is intact"):
        checkpoint.load(last)
    assert checkpoint.load(prev)["epoch"] == 1  # the previous checkpoint stays usable


def test_refuses_to_overwrite_a_run(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path, "prior.kind=gaussian", "train.epochs=1", "name=once")
    Trainer(cfg).fit()
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(cfg)


def test_importance_sampling_bounds_elbo_and_rises_with_samples(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path, "prior.kind=bype", "train.epochs=3", "name=is")
    trainer = Trainer(cfg)
    trainer.fit()
    model = trainer.model
    x = model_inputs(model, trainer.data.test)[:100]
    torch.manual_seed(0)
    ll_small, elbo_small = importance_sampled_ll(model, x, 10)
    ll_large, _ = importance_sampled_ll(model, x, 500, max_rows=2000)
    assert (ll_large.mean() >= elbo_small.mean())
    assert ll_small.mean() > elbo_small.mean() + 0.5
    assert ll_large.mean() > ll_small.mean() + 0.2  # the IS bound tightens with S


def test_time_budget_ends_a_slow_epoch_early(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path, "prior.kind=gaussian", "train.epochs=50", "train.max_minutes=0.000001", "name=budget")
    summary = Trainer(cfg).fit()
    records = read_metrics(cfg.run_dir)
    assert summary["stop_reason"] == "time budget" and summary["epochs"] == 1
    assert records[0]["steps"] == 10  # stopped at the first budget check, not after all 20 steps


@pytest.mark.parametrize("prior", ["bype", "vampprior"])
def test_triton_prior_trains_like_the_torch_prior(tmp_path, fmnist_root, monkeypatch, prior):
    """The whole trainer with the mixture prior on the Triton path (the interpreter here, BYPE_KERNEL_IMPL=triton;
    the fused plan at these sizes) gives the torch path's validation losses: the kernels' fp32 differences
    (~1e-6 nats per log-density) stay far below the losses' own rounding. ByPE: shared log-variance; VampPrior:
    diagonal. The Triton kernels must actually have run."""
    import kernels
    from kernels import mixture as mix
    from tests.helpers import triton_skip_reason

    reason = triton_skip_reason(mix._triton_module)
    if reason:
        pytest.skip(reason)
    launched = []
    run = mix._run
    monkeypatch.setattr(mix, "_run", lambda launch, device: launched.append(launch.kernel) or run(launch, device))
    losses = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv(kernels.ENV_VAR, impl)
        cfg = tiny_config(tmp_path, f"prior.kind={prior}", "train.epochs=1", f"name={impl}")
        train(cfg)
        losses[impl] = [(r["train_loss"], r["val_loss"]) for r in read_metrics(cfg.run_dir)]
    assert {"_mixture_fused_fwd_kernel", "_mixture_fused_bwd_kernel"} <= set(launched)
    for (train_t, val_t), (train_x, val_x) in zip(losses["triton"], losses["torch"]):
        assert abs(train_t - train_x) <= 1e-5 * abs(train_x) and abs(val_t - val_x) <= 1e-5 * abs(val_x)
