"""A failed start or resume leaves the run directory byte for byte as it was; report.json is never replaced
by a run that fails; a failed fresh start leaves no directory behind. Real tiny runs on Fashion-MNIST."""
import json
import os
import shutil

import pytest

from bype.train import checkpoint
from bype.train import loop as trainer
from bype.cli import main
from tests.helpers import TINY

RUN = [*TINY, "prior.kind=gaussian"]
DIVERGE = "train.lr=1.0e+30"  # the first update throws the weights to ~1e30: the next loss is NaN


def contents(run_dir) -> dict:
    """Every file under `run_dir` (relative path -> bytes): the directory 'byte for byte'."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = f.read()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fmnist_root):
    out = tmp_path_factory.mktemp("finished")
    assert main(["train", f"out_dir={out}", "name=done", *RUN, "train.epochs=2"]) == 0
    return os.path.join(out, "done")


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A private copy of the finished run (2 epochs, report.json written)."""
    path = str(tmp_path / "run")
    shutil.copytree(finished_run, path)
    assert os.path.exists(os.path.join(path, "report.json"))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bype: error:") and "\n" not in err, err
    return err


def test_resume_from_a_truncated_checkpoint_changes_nothing(run_dir, capsys):
    last = os.path.join(run_dir, "last.pt")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    before = contents(run_dir)
    assert main(["train", "--resume", run_dir, "train.epochs=3", "train.lr=0.001"]) == 2
    assert "last.pt: corrupt or truncated checkpoint" in one_line_error(capsys)
    assert contents(run_dir) == before  # config.yaml still holds the run's own settings


def test_resume_with_a_model_that_does_not_fit_changes_nothing(run_dir, capsys):
    before = contents(run_dir)
    assert main(["train", "--resume", run_dir, "model.hidden=32"]) == 2
    assert "does not fit the configured model" in one_line_error(capsys)
    assert contents(run_dir) == before


def test_resume_interrupted_before_its_first_checkpoint_restores_the_directory(run_dir, monkeypatch):
    before = contents(run_dir)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C after the first resumed epoch has trained, before its validation and checkpoint.
    monkeypatch.setattr(trainer, "validation_loss", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--resume", run_dir, "train.epochs=4", "train.patience=7"])
    assert contents(run_dir) == before  # no new tensorboard file; config.yaml and metrics.jsonl as they were
    monkeypatch.undo()
    assert main(["train", "--resume", run_dir, "train.epochs=3"]) == 0  # a later resume: the run's own settings
    assert checkpoint.load(os.path.join(run_dir, "last.pt"))["config"]["train"]["patience"] == 50


def test_report_of_a_finished_run_is_never_replaced_by_a_failing_run(run_dir, monkeypatch):
    report = open(os.path.join(run_dir, "report.json"), "rb").read()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # The resumed run trains a third epoch (a checkpoint: progress that is kept), then fails at the end.
    monkeypatch.setattr(trainer, "write_pictures", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(["train", "--resume", run_dir, "train.epochs=3"])
    assert checkpoint.load(os.path.join(run_dir, "last.pt"))["epoch"] == 3
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run_dir, "metrics.jsonl"))] == [1, 2, 3]
    assert open(os.path.join(run_dir, "report.json"), "rb").read() == report


def test_failed_fresh_starts_leave_no_directory(tmp_path, fmnist_root, capsys):
    # Stopped by a check (too large M for the 1000 examples it reads) and failing during its first epoch.
    assert main(["train", f"out_dir={tmp_path}", "name=big", *RUN, "prior.kind=bype", "prior.components=1001"]) == 2
    assert "prior.components: M=1001 exceeds the training-set size N=1000" in one_line_error(capsys)
    assert main(["train", f"out_dir={tmp_path}", "name=nan", *RUN, DIVERGE]) == 2
    assert "loss is nan" in one_line_error(capsys)
    assert os.listdir(tmp_path) == []


def test_failed_fresh_start_in_an_existing_directory_keeps_what_was_there(tmp_path, fmnist_root, capsys):
    run = tmp_path / "pre"
    run.mkdir()
    (run / "command.txt").write_text("bype train ...\n")  # `bype experiment` records the command first
    before = contents(run)
    assert main(["train", f"out_dir={tmp_path}", "name=pre", *RUN, DIVERGE]) == 2
    one_line_error(capsys)
    assert contents(run) == before and sorted(os.listdir(run)) == ["command.txt"]
