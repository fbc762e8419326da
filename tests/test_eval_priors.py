"""`bype eval RUN --priors LIST`: a trained run's test NLL under other priors, its networks fixed."""
import json
import math
import os

import pytest
import torch

from bype.cli import main
from bype.eval.priors import gap_closed, parse_priors
from tests.helpers import TINY

EPS32 = torch.finfo(torch.float32).eps
N_TRAIN = 1000  # TINY's data.train_limit


def _train(tmp_path, name, *overrides):
    assert main(["train", f"out_dir={tmp_path}", f"name={name}", *TINY, "train.epochs=2", "eval.n_samples_grid=4",
                 *overrides]) == 0
    return os.path.join(tmp_path, name)


def _priors(run, names, capsys):
    assert main(["eval", run, "--priors", names, "--samples", "16", "--limit", "60"]) == 0
    out = capsys.readouterr().out
    return json.load(open(os.path.join(run, "priors.json"))), out


def test_bype_run_under_five_priors(tmp_path, fmnist_root, capsys):
    # A frozen coreset keeps w = N/M, so `uniform` is the run's own prior written another way.
    run = _train(tmp_path, "frozen", "coreset.every=1000")
    res, out = _priors(run, "own,uniform,random,kmeans,exemplar", capsys)
    nll = {k: v["test_nll"] for k, v in res["priors"].items()}
    assert list(nll) == ["own", "uniform", "random", "kmeans", "exemplar"] and "gap_closed" in out
    assert res["n_test"] == 60 and res["is_samples"] == 16 and res["prior_kind"] == "bype"
    assert [res["priors"][k]["components"] for k in nll] == [20, 20, 20, 20, N_TRAIN]
    # log(w / N) with w = N/M (float32) against -log M: each log p(z) moves by a few float32 roundings of log N,
    # and the NLL's own sums (float64 from float32 terms) by a few roundings of its magnitude.
    assert abs(nll["own"] - nll["uniform"]) < 8 * EPS32 * (math.log(N_TRAIN) + nll["own"])
    assert len(set(nll.values()) - {nll["own"]}) >= 3  # random, kmeans, exemplar are other priors
    assert res["gap_closed"] == pytest.approx((nll["random"] - nll["own"]) / (nll["random"] - nll["exemplar"]))
    # The same random numbers for every call: a second evaluation repeats the first exactly.
    again, _ = _priors(run, "random,own", capsys)
    assert again["priors"]["random"]["test_nll"] == nll["random"] and again["priors"]["own"]["test_nll"] == nll["own"]
    assert again["gap_closed"] is None  # needs own, random and exemplar


def test_an_exemplar_runs_own_prior_is_the_exemplar_entry(tmp_path, fmnist_root, capsys):
    run = _train(tmp_path, "ex", "prior.kind=exemplar")
    res, _ = _priors(run, "own,exemplar,random", capsys)
    own, ex = res["priors"]["own"]["test_nll"], res["priors"]["exemplar"]["test_nll"]
    # The same N components and variance, encoded in other chunks: float32 rounding of the log-densities.
    assert abs(own - ex) < 64 * EPS32 * own and res["priors"]["random"]["test_nll"] != own


def test_priors_errors_are_one_line(tmp_path, fmnist_root, capsys):
    run = _train(tmp_path, "gauss", "prior.kind=gaussian")
    assert main(["eval", run, "--priors", "own,random", "--samples", "4", "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bype: error: --priors: 'random' needs a mixture prior; this run's prior is 'gaussian' (only 'own')"
    assert main(["eval", run, "--priors", "own,best", "--samples", "4"]) == 2
    assert "--priors: unknown prior 'best'" in capsys.readouterr().err


def test_parse_and_gap_closed():
    assert parse_priors(" own, random ,own") == ["own", "random"]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_priors(" , ")
    assert gap_closed({"own": 240.0, "random": 242.0, "exemplar": 238.0}) == 0.5
    assert gap_closed({"own": 240.0, "random": 242.0}) is None


@pytest.mark.dist
def test_two_ranks_compare_priors_like_one_process(tmp_path, fmnist_root, capsys):
    from tests.test_distributed import TORCHRUN, run

    run_dir = _train(tmp_path, "dist", "coreset.every=1")
    capsys.readouterr()
    one, _ = _priors(run_dir, "own,random,exemplar", capsys)
    os.remove(os.path.join(run_dir, "priors.json"))
    # Each rank encodes its block of the 1000 exemplars and evaluates its slice of the 60 test images.
    run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "bype.cli", "eval", run_dir,
         "--priors", "own,random,exemplar", "--samples", "16", "--limit", "60"], timeout=300)
    two = json.load(open(os.path.join(run_dir, "priors.json")))
    for name, row in one["priors"].items():
        # The same keyed noise and the same components: only the float32 rounding of other chunk shapes
        # differs, a few eps32 of each log-weight (~300 nats) per example.
        assert two["priors"][name]["test_nll"] == pytest.approx(row["test_nll"], rel=16 * EPS32), name
        assert two["priors"][name]["components"] == row["components"]
