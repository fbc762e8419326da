"""ShardStream: equal steps per rank, exact-once epochs, seeded order, shard specs, corrupt data; both record
layouts (blocks of samples, one sample per record)."""
import functools
import http.server
import io
import json
import logging
import math
import os
import shutil
import tarfile
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from bype.data import prepare as prep
from bype.data.stream import ShardError, ShardStream, exact_plan, is_padding, load_split_in_memory, true_index

N, SHARD, B = 250, 100, 16  # three shards of uneven size: 100, 100, 50
BLOCK = 24  # blocks straddle batch and reader boundaries; each shard ends in a short block


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:N] * 255 / 16).round().astype(np.uint8), d.target[:N].astype(np.int64)


@pytest.fixture(scope="module", params=["blocks", "samples"])
def shards(tmp_path_factory, digits, request):
    root = tmp_path_factory.mktemp("digits")
    np.savez(root / "d.npz", x_train=digits[0], y_train=digits[1])
    out = str(root / "shards")
    prep.prepare("npz", str(root / "d.npz"), out, shard_size=SHARD, layout=request.param, block_size=BLOCK,
                 progress=False)
    return out


def layout_of(shards):
    with open(os.path.join(shards, "manifest.json")) as f:
        return json.load(f)["layout"]


def copy_shards(shards, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(shards, dst)
    return dst


def run_epoch(spec, epoch=0, world_size=2, **kw):
    """Per rank: its batches of one epoch, and the streams."""
    streams = [ShardStream(spec, batch_size=B, rank=r, world_size=world_size, seed=7, **kw) for r in range(world_size)]
    return [list(s.epoch(epoch)) for s in streams], streams


def all_idx(per_rank):
    return torch.cat([b[2] for batches in per_rank for b in batches])


@pytest.mark.parametrize("mode", ["exact", "resample"])
def test_equal_steps_two_ranks_two_workers(shards, mode):
    per_rank, streams = run_epoch(shards, mode=mode, num_workers=2, shuffle_buffer=64)
    steps = math.ceil(N / (2 * B))
    assert [len(s) for s in streams] == [steps, steps]
    assert [len(b) for b in per_rank] == [steps, steps]
    for batches in per_rank:
        for x, y, idx in batches:
            assert x.shape == (B, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
            assert y.dtype == torch.long and idx.dtype == torch.long


def test_exact_mode_every_sample_once(shards, digits):
    images, labels = digits
    per_rank, streams = run_epoch(shards, mode="exact", num_workers=2, shuffle_buffer=64)
    idx = all_idx(per_rank)
    real = idx[~is_padding(idx)]
    assert sorted(real.tolist()) == list(range(N))  # union over ranks, each exactly once
    assert int(is_padding(idx).sum()) == 2 * len(streams[0]) * B - N == sum(s.padded for s in streams)
    for r, batches in enumerate(per_rank):  # padding repeats samples of the same rank
        idx_r = torch.cat([b[2] for b in batches])
        assert set(true_index(idx_r[is_padding(idx_r)]).tolist()) <= set(idx_r[~is_padding(idx_r)].tolist())
    for x, y, idx in (b for batches in per_rank for b in batches):  # content matches the source arrays
        i = true_index(idx)
        assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images[i.numpy()]))
        assert torch.equal(y, torch.from_numpy(labels[i.numpy()]))


def test_exact_mode_wrap_padding_keeps_real_indices(shards):
    per_rank, streams = run_epoch(shards, mode="exact", num_workers=0, pad="wrap", shuffle_buffer=0)
    counts = Counter(all_idx(per_rank).tolist())
    assert set(counts) == set(range(N)) and sum(counts.values()) - N == 2 * len(streams[0]) * B - N


@pytest.mark.parametrize("mode", ["exact", "resample"])
def test_order_is_seeded_by_epoch(shards, mode):
    a, _ = run_epoch(shards, epoch=3, mode=mode, num_workers=2, shuffle_buffer=64)
    b, _ = run_epoch(shards, epoch=3, mode=mode, num_workers=2, shuffle_buffer=64)
    c, _ = run_epoch(shards, epoch=4, mode=mode, num_workers=2, shuffle_buffer=64)
    assert torch.equal(all_idx(a), all_idx(b))
    assert not torch.equal(all_idx(a), all_idx(c))
    if mode == "exact":  # a different order of the same samples
        assert sorted(all_idx(a)[~is_padding(all_idx(a))].tolist()) == sorted(all_idx(c)[~is_padding(all_idx(c))].tolist())


def test_fewer_shards_than_readers(tmp_path, digits):
    np.savez(tmp_path / "small.npz", x_train=digits[0][:40], y_train=digits[1][:40])
    out = str(tmp_path / "one")
    prep.prepare("npz", str(tmp_path / "small.npz"), out, shard_size=100, progress=False)  # a single shard
    for mode in ("exact", "resample"):
        per_rank, streams = run_epoch(out, world_size=3, mode=mode, num_workers=2, shuffle_buffer=10)
        assert [len(b) for b in per_rank] == [len(s) for s in streams] == [1, 1, 1]
        if mode == "exact":
            idx = all_idx(per_rank)
            assert sorted(idx[~is_padding(idx)].tolist()) == list(range(40))


def test_exact_plan_covers_every_sample_once():
    for counts, R, W, b in [([100, 100, 50], 2, 2, 16), ([7], 4, 3, 5), ([3, 0, 11, 2], 3, 1, 4), ([1000], 1, 4, 1000)]:
        steps, plan = exact_plan(counts, seed=1, epoch=2, world_size=R, num_workers=W, batch_size=b)
        assert steps == max(1, math.ceil(sum(counts) / (R * b)))
        covered = Counter()
        for (r, w), (segments, slots) in plan.items():
            n = sum(stop - start for _, start, stop in segments)
            assert n <= slots
            covered.update((s, p) for s, start, stop in segments for p in range(start, stop))
        assert sum(slots for _, slots in plan.values()) == R * steps * b
        assert covered == Counter((s, p) for s, c in enumerate(counts) for p in range(c))
        for r in range(R):
            assert sum(plan[(r, w)][1] for w in range(W)) == steps * b


# --- shard specs -------------------------------------------------------------------------------------------

def test_specs_pattern_list_pipe(shards):
    want = sorted(range(N))
    pattern = os.path.join(shards, "train-{000000..000002}.tar")  # manifest found beside the shards
    per_rank, _ = run_epoch(pattern, mode="exact", num_workers=0, shuffle_buffer=32)
    idx = all_idx(per_rank)
    assert sorted(idx[~is_padding(idx)].tolist()) == want
    paths = [os.path.join(shards, f"train-00000{i}.tar") for i in range(3)]
    per_rank, _ = run_epoch(paths, mode="exact", num_workers=0, shuffle_buffer=32)
    assert sorted(all_idx(per_rank)[~is_padding(all_idx(per_rank))].tolist()) == want
    pipes = "::".join(f"pipe:cat {p}" for p in paths)
    per_rank, _ = run_epoch(pipes, mode="exact", num_workers=2, shuffle_buffer=32, manifest=shards)
    assert sorted(all_idx(per_rank)[~is_padding(all_idx(per_rank))].tolist()) == want


def test_specs_without_manifest(shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(shards, f"train-00000{i}.tar"), bare)
    spec = str(bare / "train-{000000..000002}.tar")
    with pytest.raises(ValueError, match="exact mode needs per-shard sample counts"):
        ShardStream(spec, batch_size=B, mode="exact")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ShardStream(spec, batch_size=B)
    s = ShardStream(spec, batch_size=B, samples_per_epoch=100, num_workers=2, shuffle_buffer=10)
    batches = list(s.epoch(0))
    assert len(batches) == len(s) == 7 and batches[0][0].shape == (B, 1, 8, 8)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_spec(shards):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=shards))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        for spec in (base + "train-{000000..000002}.tar", base):  # shards (manifest beside them), directory
            s = ShardStream(spec, batch_size=B, mode="exact", num_workers=2, shuffle_buffer=32)
            idx = torch.cat([b[2] for b in s.epoch(0)])
            assert sorted(idx[~is_padding(idx)].tolist()) == list(range(N)) and s.errors["shard"] == 0
    finally:
        server.shutdown()


# --- corrupt data --------------------------------------------------------------------------------------------

def break_record(path, index):
    """Rewrite a shard with the record holding sample `index` damaged (its PNG, or its block's images);
    returns the record's key and the sample indices it held."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    blocks = any(m.name.endswith(".x.npy") for m, _ in members)
    first = max(int(m.name.split(".")[0]) for m, _ in members if int(m.name.split(".")[0]) <= index) \
        if blocks else index
    key = f"{first:08d}"
    lost = set()
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name in (f"{key}.png", f"{key}.x.npy"):
                if blocks:
                    lost = set(range(first, first + np.load(io.BytesIO(data)).shape[0]))
                    data = data[:20] + b"garbage" * 10
                else:
                    lost, data = {index}, b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return key, lost


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 + 100)


@pytest.mark.parametrize("mode", ["exact", "resample"])
def test_corrupt_sample_and_truncated_shard_are_skipped(shards, tmp_path, caplog, mode):
    d = copy_shards(shards, tmp_path)
    key, lost = break_record(os.path.join(d, "train-000000.tar"), 5)
    truncate(os.path.join(d, "train-000001.tar"))
    kind = "block" if layout_of(shards) == "blocks" else "sample"
    # Resample draws shards at random: a longer epoch draws every shard (the draws are seeded).
    s = ShardStream(d, batch_size=B, mode=mode, num_workers=0, shuffle_buffer=32, samples_per_epoch=4 * N)
    with caplog.at_level(logging.WARNING, logger="bype.data"):
        batches = list(s.epoch(0))
    assert len(batches) == len(s) == math.ceil((N if mode == "exact" else 4 * N) / B)
    assert s.errors[kind] >= 1 and s.errors["shard"] >= 1
    assert any("train-000000.tar" in r.message and f"{kind} {key}" in r.message and r.name == "bype.data"
               for r in caplog.records)
    assert any("train-000001.tar" in r.message and "truncated" in r.message or "unreadable" in r.message
               for r in caplog.records if "train-000001.tar" in r.message)
    idx = torch.cat([b[2] for b in batches])
    assert not lost & set(true_index(idx).tolist())
    if mode == "exact":
        assert s.errors == {"block": 0, "sample": 0, "shard": 1, kind: 1}
        real = idx[~is_padding(idx)].tolist()
        assert len(real) == len(set(real)) and set(range(SHARD)) - lost <= set(real)


def test_worker_errors_reach_the_main_process(shards, tmp_path, caplog):
    d = copy_shards(shards, tmp_path)
    truncate(os.path.join(d, "train-000002.tar"))
    s = ShardStream(d, batch_size=B, mode="exact", num_workers=2, shuffle_buffer=32)
    with caplog.at_level(logging.WARNING, logger="bype.data"):
        assert len(list(s.epoch(0))) == len(s)
    # Cut inside a record's member or between records: a broken block or a truncated shard, reported once.
    assert sum(s.errors.values()) == 1 and any("train-000002.tar" in r.message for r in caplog.records)


@pytest.mark.parametrize("damage,workers", [("record", 0), ("truncate", 0), ("truncate", 2)])
def test_on_error_raise_names_the_shard(shards, tmp_path, damage, workers):
    d = copy_shards(shards, tmp_path)
    path = os.path.join(d, "train-000001.tar")
    break_record(path, 150) if damage == "record" else truncate(path)
    s = ShardStream(d, batch_size=B, mode="exact", num_workers=workers, on_error="raise", shuffle_buffer=32)
    with pytest.raises(ShardError, match="train-000001.tar") as e:
        list(s.epoch(0))
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)  # the command line prints one line


def test_load_split_in_memory(shards, digits, tmp_path):
    x, y = load_split_in_memory(shards, "train")
    assert x.dtype == torch.uint8 and x.shape == (N, 1, 8, 8) and y.dtype == torch.long
    assert torch.equal(x[:, 0], torch.from_numpy(digits[0])) and torch.equal(y, torch.from_numpy(digits[1]))
    d = copy_shards(shards, tmp_path)
    key, lost = break_record(os.path.join(d, "train-000002.tar"), 210)
    with pytest.raises(ValueError, match="train-000002.tar: sha256 differs"):
        load_split_in_memory(d, "train")
    with pytest.raises(ValueError, match=f"train-000002.tar.*{key}"):
        load_split_in_memory(d, "train", verify=False)
    # Skipping keeps every row at its index: unreadable ones are zero images with label -1.
    xs, ys = load_split_in_memory(d, "train", verify=False, on_error="skip")
    lost = sorted(lost)
    assert (ys[lost] == -1).all() and not xs[lost].any()
    keep = torch.tensor([i for i in range(N) if i not in lost])
    assert torch.equal(xs[keep], x[keep]) and torch.equal(ys[keep], y[keep])
    with pytest.raises(KeyError, match="no split 'val'"):
        load_split_in_memory(shards, "val")


def test_argument_errors(shards):
    with pytest.raises(ValueError, match="mode"):
        ShardStream(shards, batch_size=B, mode="sequential")
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        ShardStream(shards, batch_size=B, rank=2, world_size=2)
    s = ShardStream(shards, batch_size=B)  # no process group: a single rank
    assert (s.rank, s.world_size) == (0, 1) and len(s) == math.ceil(N / B)


def test_rank_and_world_size_from_torch_distributed(shards, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    s = ShardStream(shards, batch_size=B, mode="exact", num_workers=0)
    assert (s.rank, s.world_size) == (1, 2) and len(s) == math.ceil(N / (2 * B))
    mine = torch.cat([b[2] for b in s.epoch(0)])
    other = torch.cat([b[2] for b in ShardStream(shards, batch_size=B, mode="exact", num_workers=0, rank=0).epoch(0)])
    real = lambda i: set(i[~is_padding(i)].tolist())  # noqa: E731
    assert real(mine).isdisjoint(real(other)) and real(mine) | real(other) == set(range(N))


def test_first_batch_needs_no_more_than_the_buffer(shards, monkeypatch):
    """Resample mode never ends: the first batch must come after about `shuffle_buffer` samples, whatever
    the layout (one-sample records are not held back in a window of their own)."""
    import bype.data.stream.reader as stream_module

    decoded = []
    real = stream_module.decode_sample
    monkeypatch.setattr(stream_module, "decode_sample", lambda *a: decoded.append(1) or real(*a))
    s = ShardStream(shards, batch_size=B, num_workers=0, shuffle_buffer=40, samples_per_epoch=B)
    assert len(list(s.epoch(0))) == 1
    if layout_of(shards) == "samples":
        # At most the buffer, two batches (a batch is held until the next exists, so reports travel with
        # it) and one group of 32 decoded images.
        assert 2 * B <= len(decoded) <= 40 + 2 * B + 32
