"""ByPE training streamed from webdataset shards behaves like the in-memory run on the same data."""
import json
import os

import torch

from bype.data import load_data
from bype.data import prepare as prep
from bype.trainer import Trainer
from tests.helpers import tiny_config

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
