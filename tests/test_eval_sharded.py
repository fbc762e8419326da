"""Sharded evaluation: torchrun with 2 gloo ranks gives the validation loss, test NLL, ELBO and kNN
accuracy of one process (each rank evaluated its slice; rank 0 reports)."""
import json

import pytest

from bype.config import load_config
from bype.eval.evaluate import evaluate, validation_loss
from bype.train.loop import Trainer
from tests.helpers import TINY
from tests.test_distributed import TORCHRUN, run

pytestmark = pytest.mark.dist

# Uneven slices (101 = 51 + 50 test examples), Bernoulli data (the keyed binarisation), two noise draws
# per sample (HVAE), the bype prior's mixture.
SETUP = [*TINY, "data.eval_limit=101", "model.arch=hvae", "prior.kind=bype", "train.cost_estimate=false"]
N_SAMPLES, KS = 30, [1, 3]

DRIVER = """
import json, sys
from bype.config import load_config
from bype.parallel.process_group import finish
from bype.eval.evaluate import evaluate, validation_loss
from bype.train.loop import Trainer
trainer = Trainer(load_config(None, sys.argv[2:]))
val = validation_loss(trainer.model, trainer.data.val, ctx=trainer.ctx)
report = evaluate(trainer.model, trainer.data.test, trainer.data.train_split(), {n}, None, {ks}, ctx=trainer.ctx)
if trainer.ctx.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({{"val": val, "report": report}}, f)
finish(0)
""".format(n=N_SAMPLES, ks=KS)


def test_two_ranks_evaluate_like_one_process(tmp_path, fmnist_root):
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "sharded.json"
    run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", tmp_path / "driver.py", out,
         f"out_dir={tmp_path}", "name=sharded", "dist.engine=ddp", *SETUP])
    got = json.loads(out.read_text())

    trainer = Trainer(load_config(None, [f"out_dir={tmp_path}", "name=one", *SETUP]))
    val = validation_loss(trainer.model, trainer.data.val)
    report = evaluate(trainer.model, trainer.data.test, trainer.data.train_split(), N_SAMPLES, None, KS)

    # The same initial model, the same keyed noise: only float32 rounding of different batch shapes
    # differs, relative ~1e-7 per example over ~100 examples of ~500 nats.
    for k in val:  # kl is a small difference of terms as large as the loss: tolerance scaled by the loss
        assert got["val"][k] == pytest.approx(val[k], abs=1e-6 * abs(val["loss"])), k
    for k in ("test_nll", "test_elbo"):
        assert got["report"][k] == pytest.approx(report[k], rel=1e-6), k
    for k in KS:  # the same means up to rounding: the same neighbours
        assert got["report"][f"knn_{k}"] == report[f"knn_{k}"]
    assert got["report"]["n_test"] == report["n_test"] == 101
