"""The `bype` command line, run in-process on real Fashion-MNIST with tiny settings."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from bype.cli import main
from tests.helpers import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_eval_limit_zero_is_one_line(tmp_path, capsys):
    # Refused before the run is loaded: zero examples cannot give an NLL.
    assert main(["eval", str(tmp_path / "any"), "--limit", "0"]) == 2
    assert capsys.readouterr().err.strip() == "bype: error: --limit: must be a positive number, got 0"


def test_check_of_a_resume_reads_the_checkpoint(tmp_path, fmnist_root, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(f"out_dir: {tmp_path}\nname: r\n")
    (run / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", "--check", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bype: error: {run / 'last.pt'}: corrupt or truncated checkpoint") and "\n" not in err
    assert main(["train", "--check", f"out_dir={tmp_path}", "name=r"]) == 2  # a fresh start would overwrite it
    assert "already holds a run" in capsys.readouterr().err


LAUNCHERS = [["launch/torchrun.sh", "2"], ["launch/deepspeed.sh", "2"],
             ["launch/multinode.sh", "--master-addr", "127.0.0.1", "--nnodes", "2", "--node-rank", "1"],
             ["launch/slurm.sbatch"]]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda a: a[0].split("/")[1])
def test_launchers_report_a_bad_key_once_before_any_worker(launcher, tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, TORCHRUN=os.path.join(bin_dir, "torchrun"), DEEPSPEED=os.path.join(bin_dir, "deepspeed"),
               PYTHONPATH=ROOT)
    r = subprocess.run(["bash", *launcher, f"out_dir={tmp_path}", "train.epoch=3"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert r.stdout == "" and len(lines) == 1, r.stderr  # one line, printed once, no traceback
    assert lines[0].startswith("bype: error: train.epoch: unknown key (known here: ") and " epochs," in lines[0]
    assert os.listdir(tmp_path) == []


# Each launcher knows its process count: 2 (torchrun, deepspeed, 2 nodes x 1), 3 (SLURM: 3 nodes x 1).
WORLDS = {"torchrun.sh": 2, "deepspeed.sh": 2, "multinode.sh": 2, "slurm.sbatch": 3}


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda a: a[0].split("/")[1])
def test_launchers_check_the_batch_against_their_world_size(launcher, tmp_path):
    world = WORLDS[launcher[0].split("/")[1]]
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, TORCHRUN=os.path.join(bin_dir, "torchrun"), DEEPSPEED=os.path.join(bin_dir, "deepspeed"),
               PYTHONPATH=ROOT, SLURM_NNODES="3", SLURM_GPUS_ON_NODE="1")
    env.pop("HOSTFILE", None)
    r = subprocess.run(["bash", *launcher, f"out_dir={tmp_path}", "train.batch_size=101"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"bype: error: train.batch_size: 101 (the global batch) is not divisible by the "
                                f"world size {world}; use a multiple of {world}, e.g. {world * round(101 / world)}")
    assert os.listdir(tmp_path) == []


def test_check_of_a_zero_resume_needs_the_same_world_size(tmp_path, capsys):
    from bype.train import checkpoint

    run = tmp_path / "z"
    run.mkdir()
    (run / "config.yaml").write_text(f"out_dir: {tmp_path}\nname: z\ndist:\n  engine: deepspeed\n  zero_stage: 2\n"
                                     "data:\n  train_limit: 1000\n")
    checkpoint.save({"engine": {"deepspeed_tag": "epoch1", "zero_stage": 2, "world_size": 2}}, str(run / "last.pt"))
    assert main(["train", "--check", "--world-size", "4", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bype: error: {run / 'last.pt'}: the ZeRO-2 optimiser state was partitioned over 2 ranks; "
                   "resume with 2 processes, not 4")
    assert main(["train", "--check", "--world-size", "2", "--resume", str(run)]) == 0
    assert "2 processes" in capsys.readouterr().out
    # a launcher that cannot tell the world size (elastic node range, a DeepSpeed hostfile) passes none:
    # the ZeRO comparison is left to the workers, never made against an assumed single process
    assert main(["train", "--check", "--resume", str(run)]) == 0
    assert "processes: unknown" in capsys.readouterr().out
