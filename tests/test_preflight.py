"""Sizes are checked against the data the run reads (manifest counts, data.train_limit), in one line, before
any file is written; `bype train --check` runs the same checks alone."""
import os

import pytest

from bype.cli import main
from bype.config import ConfigError, load_config
from bype.data import prepare as prep
from bype.train.preflight import check_start, data_counts
from tests.test_data_prepare import write_celeba

CELEBA = "configs/celeba/vae-bype.yaml"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """A real small shard set in the CelebA layout: 60 face photographs, 40 / 10 / 10."""
    root = tmp_path_factory.mktemp("celeba")
    write_celeba(str(root / "src"))
    prep.prepare("celeba", str(root / "src"), str(root / "shards"), shard_size=16, progress=False)
    return str(root / "shards")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bype: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("check", [["--check"], []])
def test_too_large_m_for_a_small_shard_set_stops_in_one_line(faces, tmp_path, capsys, check):
    # The CelebA config asks for M = 500; the manifest holds 40 training faces (not CelebA's 162,770).
    assert main(["train", *check, "--config", CELEBA, f"data.shards={faces}", f"out_dir={tmp_path}"]) == 2
    err = one_line_error(capsys)
    assert err == (f"bype: error: prior.components: M=500 exceeds the training-set size N=40 "
                   f"({os.path.join(faces, 'manifest.json')})")
    assert os.listdir(tmp_path) == []  # nothing written


def test_check_passes_within_the_counts(faces, tmp_path, capsys):
    args = ["--config", CELEBA, f"data.shards={faces}", f"out_dir={tmp_path}", "prior.components=40",
            "train.batch_size=20", "eval.knn_k=[3]"]
    assert main(["train", "--check", *args]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("bype: check passed: start") and "train 40, val 10, test 10" in out
    assert main(["train", "--check", *args, "train.batch_size=41"]) == 2
    assert "train.batch_size: 41 exceeds the training-set size N=40" in one_line_error(capsys)
    assert main(["train", "--check", *args, "eval.knn_k=[50]"]) == 2
    assert "eval.knn_k: k=50 exceeds the N=40 training examples" in one_line_error(capsys)
    assert main(["train", "--check", *args, "data.eval_limit=5"]) == 0
    assert "train 40, val 5, test 5" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def test_shards_of_ones_own_images_train_under_a_named_data_set(tmp_path):
    """`bype data prepare npz` (or imagefolder) shards carry no data set name: they pass the check with the
    data.dataset of their kind (here colour images as celeba), counts from their manifest."""
    import numpy as np

    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x_train=x, y_train=np.zeros(40, np.int64), x_val=x[:10], x_test=x[:10])
    prep.prepare("npz", str(tmp_path / "mine.npz"), str(tmp_path / "shards"), shard_size=16, progress=False)
    cfg = load_config(CELEBA, [f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path}", "prior.components=20",
                               "train.batch_size=20", "eval.knn_k=[3]"])
    assert check_start(cfg, resume=False)["train"] == 40


def test_shards_of_another_data_set_or_a_train_limit_are_refused(faces, tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.dataset=cifar10", "model.likelihood=logistic",
                             "data.source=shards", f"data.shards={faces}"])
    with pytest.raises(ConfigError, match="data.shards: .*manifest.json holds celeba shards, but data.dataset is cifar10"):
        data_counts(cfg)
    with pytest.raises(ConfigError, match="data.train_limit: applies to data.source=memory"):
        load_config(CELEBA, [f"data.shards={faces}", "data.train_limit=20"])


@pytest.mark.parametrize("overrides, message", [
    (["prior.components=60000"], "prior.components: M=60000 exceeds the training-set size N=50000 "),
    (["data.train_limit=100"], "prior.components: M=500 exceeds the training-set size N=100 "),
    (["prior.kind=gaussian", "data.train_limit=100", "train.batch_size=101"],
     "train.batch_size: 101 exceeds the training-set size N=100 "),
])
def test_memory_counts_come_from_the_idx_files_and_train_limit(fmnist_root, tmp_path, overrides, message):
    cfg = load_config(None, [f"out_dir={tmp_path}", f"data.root={fmnist_root}", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_start(cfg, resume=False)


def test_counts_of_the_default_job(fmnist_root, tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.eval_limit=2000"])
    assert check_start(cfg, resume=False) == {"train": 50000, "val": 2000, "test": 2000}
