"""A checkpoint is data, never code: every load unpickles with weights_only=True, so a checkpoint whose pickle
calls a function (os.system) is refused in one line without running it; what bype saves is plain data that
such a load takes, and checkpoints of earlier releases (numpy's RNG state as an array) still load. Real tiny
runs on Fashion-MNIST."""
import os
import random
import shutil

import numpy as np
import pytest
import torch

from bype.train import checkpoint
from bype.cli import main
from tests.helpers import TINY


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do with any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fmnist_root):
    """A ByPE run of 2 epochs: its checkpoints hold Adam, the coreset optimiser and every RNG state."""
    out = tmp_path_factory.mktemp("safety")
    assert main(["train", f"out_dir={out}", "name=run", *TINY, "prior.kind=bype", "train.epochs=2"]) == 0
    return os.path.join(out, "run")


@pytest.fixture
def run_dir(finished_run, tmp_path):
    path = str(tmp_path / "run")
    shutil.copytree(finished_run, path)
    return path


def craft(path, marker):
    """The real checkpoint at `path` plus one object whose unpickling runs `touch marker`."""
    state = checkpoint.load(path)
    state["extra"] = RunsCode(marker)
    torch.save(state, path)


@pytest.mark.parametrize("command", [["eval", "--samples", "5", "--limit", "10", "--no-knn"], ["sample", "--n", "4"],
                                     ["augment", "--epochs", "1", "--train-limit", "100"], ["train", "--resume"]],
                         ids=lambda c: c[0])
def test_a_checkpoint_that_runs_code_is_refused_in_one_line(run_dir, tmp_path, capsys, command):
    name = "last.pt" if "--resume" in command else "best.pt"
    path, marker = os.path.join(run_dir, name), tmp_path / "ran"
    craft(path, marker)
    crafted = open(path, "rb").read()
    argv = [*command, run_dir] if command[0] == "train" else [command[0], run_dir, *command[1:]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in captured.out + captured.err, err
    assert err.startswith(f"bype: error: {path}: refused to load {os.system.__module__}.system: "), err
    assert not marker.exists()  # the command never ran
    assert open(path, "rb").read() == crafted  # and nothing rewrote the file

    # The control: the same file through the old unsafe load does run the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoints_hold_plain_data_and_round_trip(run_dir):
    last = os.path.join(run_dir, "last.pt")
    # Nothing beyond what weights_only allows by default: no numpy, no bype class.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 2 and state["coreset"]["updates"] == 1 and state["engine"]["optimizer"]["state"]

    # The saved RNG state restores every generator: the draws after it repeat exactly.
    saved = checkpoint.rng_state()
    draws = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    checkpoint.save({"rng": saved}, os.path.join(run_dir, "rng.pt"))
    checkpoint.set_rng_state(checkpoint.load(os.path.join(run_dir, "rng.pt"))["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == draws


def test_a_checkpoint_of_an_earlier_release_still_loads(run_dir):
    """Earlier releases saved np.random.get_state(): a tuple holding a uint32 array, which needs numpy's globals."""
    last = os.path.join(run_dir, "last.pt")
    state = checkpoint.load(last)
    np.random.seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of the state too
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, last)  # as they wrote it
    assert any(g.startswith("numpy") for g in torch.serialization.get_unsafe_globals_in_checkpoint(last))
    expected = np.random.standard_normal(4)

    loaded = checkpoint.load(last)
    np.random.seed(0)
    checkpoint.set_rng_state(loaded["rng"])
    assert np.array_equal(np.random.standard_normal(4), expected)
    assert main(["train", "--resume", run_dir, "train.epochs=3"]) == 0  # and the run goes on from it
    assert checkpoint.load(last)["epoch"] == 3


def test_save_takes_numpy_numbers_and_refuses_objects(tmp_path):
    path = str(tmp_path / "c.pt")
    checkpoint.save({"history": [{"loss": np.float64(1.5), "steps": np.int64(5)}]}, path)
    history = checkpoint.load(path)["history"]
    assert history == [{"loss": 1.5, "steps": 5}] and type(history[0]["loss"]) is float
    # Refused when saved, naming where, not at the resume that could not load it; the old file stays.
    with pytest.raises(TypeError, match=r"state\['extra'\]: a (tests\.)?test_checkpoint_safety\.RunsCode cannot go "):
        checkpoint.save({"extra": RunsCode(tmp_path / "never")}, path)
    assert checkpoint.load(path)["history"] == history
