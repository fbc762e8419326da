"""The `bype` command line, run in-process on real Fashion-MNIST with tiny settings."""
import json
import os

from PIL import Image

from bype.cli import main
from tests.helpers import TINY


def test_train_eval_sample_resume(tmp_path, fmnist_root, capsys):
    run = os.path.join(tmp_path, "cli")
    assert main(["train", f"out_dir={tmp_path}", "name=cli", *TINY, "prior.kind=gaussian", "train.epochs=2",
                 "eval.at_end=true", "eval.is_samples=20"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out and "test_nll" in out
    report = json.load(open(os.path.join(run, "report.json")))
    assert 100 < report["test_nll"] < 800 and report["test_nll"] <= -report["test_elbo"] + 1e-6

    assert main(["eval", run, "--samples", "30", "--limit", "40", "--no-knn"]) == 0
    ev = json.load(open(os.path.join(run, "eval_S30.json")))
    assert ev["n_test"] == 40 and ev["is_samples"] == 30 and "knn_3" not in ev

    assert main(["sample", run, "--n", "16", "--out", str(tmp_path / "s.png")]) == 0
    img = Image.open(tmp_path / "s.png")
    assert img.size[0] > 4 * 28  # a 4x4 grid of 28x28 images, scaled

    assert main(["train", "--resume", run, "train.epochs=3"]) == 0
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert epochs == [1, 2, 3]


def test_bad_run_dir_is_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bype: error:") and "config.yaml" in err and "\n" not in err
