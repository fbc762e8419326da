"""Training streamed from webdataset shards: ByPE behaves like the in-memory run on the same data; one policy
for a corrupt training shard (verified at start-up, or skipped and counted); one-line errors."""
import json
import math
import os
import shutil

import pytest
import torch

from bype.data import load_data
from bype.data import prepare as prep
from bype.train.loop import Trainer
from tests.helpers import TINY, tiny_config

LIMIT = 1000


def test_bype_on_shards_matches_in_memory(tmp_path, fmnist_root):
    shards = str(tmp_path / "shards")
    prep.prepare("fashion-mnist", fmnist_root, shards, shard_size=300, limit=LIMIT, progress=False)
    common = ["prior.kind=bype", "train.epochs=4", "data.eval_limit=200"]
    memory = tiny_config(tmp_path, *common, "name=memory")
    stream = tiny_config(tmp_path, *common, "name=stream", "data.source=shards", f"data.shards={shards}",
                         "data.stream.mode=exact", "data.num_workers=0", "data.train_limit=null")

    # The same training set either way: the exact coreset data term sees identical statistics.
    a, b = load_data(memory), load_data(stream)
    assert a.n_train == b.n_train == LIMIT and len(a.train_loader) == len(b.train_loader) == LIMIT // 50
    torch.testing.assert_close(a.stats["sum_x"], b.stats["sum_x"].to(a.stats["sum_x"]))
    assert torch.equal(a.val.x, b.val.x)

    runs = {}
    for cfg in (memory, stream):
        Trainer(cfg).fit()
        with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
            runs[cfg.name] = [json.loads(line) for line in f]
    for name, records in runs.items():
        assert [r["steps"] for r in records] == [LIMIT // 50] * 4, name
        assert records[-1]["val_loss"] < records[0]["val_loss"] - 5, name
        assert [r["epoch"] for r in records if "coreset_heldout_half_var_before" in r] == [2, 4], name
    # Different data order, same data and model: the curves agree to within a few nats.
    final = {name: records[-1]["val_loss"] for name, records in runs.items()}
    assert abs(final["memory"] - final["stream"]) < 0.05 * final["memory"], final


def corrupt(path):
    """Flip bytes in the middle of a shard: its sha256 changes and the block there no longer decodes."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 4096)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, fmnist_root):
    out = str(tmp_path_factory.mktemp("small") / "shards")
    prep.prepare("fashion-mnist", fmnist_root, out, shard_size=250, limit=LIMIT, progress=False)
    return out


@pytest.mark.parametrize("prior", ["gaussian", "bype"])
def test_corrupt_training_shard_one_policy_for_every_prior(tmp_path, small_shards, prior):
    shards = str(tmp_path / "shards")
    shutil.copytree(small_shards, shards)
    corrupt(os.path.join(shards, "train-000001.tar"))
    common = [f"prior.kind={prior}", "data.source=shards", f"data.shards={shards}", "data.stream.mode=exact",
              "data.num_workers=0", "data.train_limit=null", "data.eval_limit=100"]
    # Verified at start-up: refused before any work, in one line naming the shard and the opt-out.
    with pytest.raises(ValueError, match=r"train-000001\.tar: sha256 differs.*data\.stream\.verify=false") as e:
        Trainer(tiny_config(tmp_path, *common, "name=verified"))
    assert "\n" not in str(e.value)
    # Opted out: the run starts, streams every step of the epoch and counts what it skipped.
    trainer = Trainer(tiny_config(tmp_path, *common, "name=opted-out", "data.stream.verify=false"))
    record = trainer.train_epoch(1)
    stream = trainer.data.train_loader
    assert record["steps"] == len(stream) == LIMIT // 50 and stream.errors["block"] + stream.errors["shard"] >= 1
    assert math.isfinite(record["train_loss"])


def test_on_error_raise_is_one_line_on_the_command_line(tmp_path, small_shards, capsys):
    from bype.cli import main

    shards = str(tmp_path / "shards")
    shutil.copytree(small_shards, shards)
    corrupt(os.path.join(shards, "train-000002.tar"))
    code = main(["train", f"out_dir={tmp_path}", "name=raise", *TINY, "prior.kind=gaussian", "train.epochs=1",
                 "data.source=shards", f"data.shards={shards}", "data.train_limit=null", "data.num_workers=1",
                 "data.stream.on_error=raise", "data.stream.verify=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train-000002.tar" in err[0] and "Traceback" not in err[0], err
