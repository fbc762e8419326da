"""The start-up cost estimate: measured step times, predicted epoch and update, a warning when an update
outweighs the epochs it serves, and nothing of the run changed by measuring."""
import logging
from pathlib import Path

import pytest
import torch

from bype.config import load_config
from bype.train.cost_estimate import estimate_costs, log_estimate
from bype.train.loop import Trainer
from tests.helpers import tiny_config

SMOKE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "smoke").glob("*.yaml"))


class Records(logging.Handler):
    """The bype logger's records (it does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_estimate_predicts_from_measured_steps_and_warns(tmp_path, fmnist_root):
    # 2000 coreset steps at S = 400 against epochs of 20 training steps.
    cfg = tiny_config(tmp_path, "prior.kind=bype", "coreset.every=1", "coreset.steps=2000", "coreset.samples=400",
                      "train.cost_estimate=false", "name=warn")
    trainer = Trainer(cfg)
    seen, logger = Records(), logging.getLogger("bype")
    logger.addHandler(seen)
    try:
        est = estimate_costs(trainer)
    finally:
        logger.removeHandler(seen)
    text = "\n".join(r.getMessage() for r in seen.records)
    assert est["steps_per_epoch"] == 20 and est["coreset_steps"] == 2000 and est["coreset_every"] == 1
    assert est["train_step_s"] > 0 and est["coreset_step_s"] > 0
    assert est["epoch_s"] == pytest.approx(20 * est["train_step_s"])
    assert est["update_s"] == pytest.approx(2000 * est["coreset_step_s"])
    assert "per epoch" in text and "per update every 1 epochs" in text
    warned = [r for r in seen.records if r.levelno == logging.WARNING and "outweighs" in r.getMessage()]
    assert len(warned) == (est["update_s"] > est["epoch_s"])  # which way depends on the measured times


def test_warns_exactly_when_an_update_outweighs_its_epochs():
    base = {"train_step_s": 0.1, "steps_per_epoch": 100, "epoch_s": 10.0, "coreset_step_s": 0.5,
            "coreset_every": 10, "samples": 500, "components": 500}
    assert not log_estimate({**base, "coreset_steps": 200, "update_s": 100.0})  # 100 s against 10 epochs of 10 s
    assert log_estimate({**base, "coreset_steps": 202, "update_s": 101.0})
    no_epoch = {k: v for k, v in base.items() if k not in ("train_step_s", "epoch_s")}
    assert not log_estimate({**no_epoch, "coreset_steps": 10**6, "update_s": 5e5})  # epoch not measured


def test_measuring_changes_nothing(tmp_path, fmnist_root):
    # Two runs differing only in the estimate: the same state after start-up and after one epoch.
    states = []
    for flag in ("true", "false"):
        trainer = Trainer(tiny_config(tmp_path, "prior.kind=exemplar", "prior.exemplar.subset=100",
                                      "train.epochs=1", f"train.cost_estimate={flag}", f"name=est-{flag}"))
        rng = torch.get_rng_state()
        trainer.fit()
        states.append((rng, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (rng_a, a), (rng_b, b) = states
    assert torch.equal(rng_a, rng_b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("path", SMOKE_CONFIGS)
def test_smoke_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.train.max_minutes is not None and cfg.train.max_minutes <= 5  # minutes, on a CPU
    assert cfg.prior.kind == "bype" and cfg.coreset.every <= cfg.train.epochs  # a coreset update happens
    assert cfg.eval.is_samples <= 500 and cfg.eval.at_end


def test_every_data_set_has_a_smoke_config():
    assert sorted(p.stem for p in SMOKE_CONFIGS) == ["celeba", "cifar10", "fashion-mnist", "mnist"]
