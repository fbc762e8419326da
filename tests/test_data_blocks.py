"""Block records and the array pipeline: shuffles, persistent workers, resume order, device-side
conversion, worker cap, `bype data repack`."""
import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from bype.data import device_batches
from bype.data import prepare as prep
from bype.data.manifest import manifest_layout
from bype.data.repack import repack
from bype.data.shuffle import BatchShuffler, rechunk
from bype.data.stream import ShardStream, available_cpus, is_padding, load_split_in_memory

N, B = 300, 16


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:N] * 255 / 16).round().astype(np.uint8), d.target[:N].astype(np.int64)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("blocks")
    np.savez(root / "d.npz", x_train=digits[0], y_train=digits[1])
    out = str(root / "shards")
    prep.prepare("npz", str(root / "d.npz"), out, shard_size=110, block_size=32, progress=False)
    return out


def chunks_of(sizes, dim=3):
    start = 0
    for k in sizes:
        idx = np.arange(start, start + k)
        yield np.repeat(idx[:, None], dim, 1).astype(np.int32), idx % 7, idx
        start += k


@pytest.mark.parametrize("buffer", [0, 40])
def test_batch_shuffler_yields_every_sample_once(buffer):
    def run(seed):
        shuffler = BatchShuffler(B, buffer, np.random.default_rng(seed))
        batches = [b for c in chunks_of([5, 32, 1, 64, 17, 32]) for b in shuffler.push(c)]
        ready, rest = shuffler.drain()
        return batches + ready, rest

    batches, rest = run(3)
    assert all(len(b[0]) == B for b in batches) and len(rest[0]) == 151 % B
    idx = np.concatenate([b[2] for b in batches] + [rest[2]])
    assert sorted(idx.tolist()) == list(range(151))
    for x, y, i in batches:  # the rows of x, y and idx travel together
        assert (x == i[:, None]).all() and (y == i % 7).all()
    again = np.concatenate([b[2] for b in run(3)[0]])
    assert np.array_equal(again, idx[:len(again)])  # seeded
    if buffer:
        assert not np.array_equal(idx, np.arange(151))
        assert not np.array_equal(np.concatenate([b[2] for b in run(4)[0]]), again)
    else:
        assert np.array_equal(idx, np.arange(151))  # no buffer: arrival order


def test_rechunk_keeps_order_and_cuts_exact_sizes():
    out = list(rechunk(chunks_of([5, 32, 1, 64]), 30))
    assert [len(c[2]) for c in out] == [30, 30, 30, 12]
    assert np.array_equal(np.concatenate([c[2] for c in out]), np.arange(102))


def test_prepare_writes_blocks_by_default(blocks, digits):
    with open(os.path.join(blocks, "manifest.json")) as f:
        m = json.load(f)
    assert (m["layout"], m["block_size"], m["encoding"]) == ("blocks", 32, "raw")
    assert manifest_layout({k: v for k, v in m.items() if k != "layout"}) == "samples"  # older manifests
    x, y = load_split_in_memory(blocks, "train")
    assert torch.equal(x[:, 0], torch.from_numpy(digits[0])) and torch.equal(y, torch.from_numpy(digits[1]))


@pytest.mark.parametrize("mode", ["exact", "resample"])
def test_a_new_stream_replays_an_epoch_like_a_resumed_run(blocks, mode):
    """Persistent workers serve epoch after epoch (resample epochs are cut mid-stream); a stream made
    afresh, as a resumed run makes it, gives the same batches for the same epoch."""
    kw = dict(batch_size=B, seed=5, num_workers=2, mode=mode, shuffle_buffer=64)
    running = ShardStream(blocks, **kw)
    for e in range(3):
        seen = list(running.epoch(e))
    fresh = list(ShardStream(blocks, **kw).epoch(2))
    assert len(seen) == len(fresh) == len(running)
    for (xa, _, ia), (xb, _, ib) in zip(seen, fresh):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    if mode == "exact":
        idx = torch.cat([b[2] for b in seen])
        assert sorted(idx[~is_padding(idx)].tolist()) == list(range(N))


def test_device_batches_convert_uint8_on_the_device(blocks):
    s = ShardStream(blocks, batch_size=B, num_workers=1, mode="exact", shuffle_buffer=64)
    floats = list(s.epoch(1))
    moved = list(device_batches(s, 1, torch.device("cpu")))
    raw = next(iter(s.raw_epoch(1)))[0]
    assert raw.dtype == torch.uint8 and len(floats) == len(moved)
    for (xa, ya, ia), (xb, yb, ib) in zip(floats, moved):
        assert xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ia, ib)


def test_workers_capped_at_the_cores_available(blocks):
    s = ShardStream(blocks, batch_size=B, num_workers=available_cpus() + 3, mode="exact")
    assert s.num_workers == available_cpus()
    assert len(list(s.epoch(0))) == len(s)


def write_foreign(path_pattern, images, fmt, broken=None):
    """Webdataset shards as other tools write them: one image per record, `cls`, no idx, no manifest."""
    with wds.ShardWriter(path_pattern, maxcount=120, verbose=0) as sink:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt)
            data = b"not an image" if i == broken else buf.getvalue()
            sink.write({"__key__": f"img{i:05d}", fmt.lower().replace("jpeg", "jpg"): data, "cls": str(i % 3).encode()})
    folder = os.path.dirname(path_pattern)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))


def test_repack_foreign_shards_into_blocks(tmp_path, digits):
    rgb = np.repeat(digits[0][:250, :, :, None], 3, axis=3)
    (tmp_path / "png").mkdir()
    urls = write_foreign(str(tmp_path / "png" / "part-%03d.tar"), rgb, "PNG")
    summary = repack("::".join(urls), str(tmp_path / "out"), shard_size=100, block_size=40, workers=2,
                     progress=False, log=lambda m: None)
    m = summary["manifest"]
    assert m["shape"] == [3, 8, 8] and [s["count"] for s in m["splits"]["train"]["shards"]] == [100, 100, 50]
    x, y = load_split_in_memory(str(tmp_path / "out"), "train")  # numbered in reading order
    assert torch.equal(x, torch.from_numpy(rgb).permute(0, 3, 1, 2)) and torch.equal(y, torch.arange(250) % 3)
    np.testing.assert_allclose(m["splits"]["train"]["stats"]["sum_x"],
                               (rgb.transpose(0, 3, 1, 2).reshape(250, -1) / 255.0).sum(0), rtol=1e-12)
    # JPEG is lossy: the repacked images are what PIL decodes, close to the originals.
    (tmp_path / "jpg").mkdir()
    urls = write_foreign(str(tmp_path / "jpg" / "part-%03d.tar"), rgb, "JPEG")
    repack("::".join(urls), str(tmp_path / "outj"), shard_size=100, workers=1, progress=False, log=lambda m: None)
    xj, _ = load_split_in_memory(str(tmp_path / "outj"), "train")
    assert xj.shape == x.shape and (xj.float() - x.float()).abs().mean() < 8  # grey levels 0..255


def test_repack_names_a_broken_record(tmp_path, digits):
    urls = write_foreign(str(tmp_path / "part-%03d.tar"), digits[0][:150], "PNG", broken=130)
    with pytest.raises(ValueError, match=r"part-001\.tar: sample img00130: broken png") as e:
        repack("::".join(urls), str(tmp_path / "out"), workers=2, progress=False, log=lambda m: None)
    assert "\n" not in str(e.value)


def test_repack_prepared_png_directory_keeps_indices(tmp_path, digits):
    np.savez(tmp_path / "d.npz", x_train=digits[0], y_train=digits[1], x_val=digits[0][:40], y_val=digits[1][:40])
    prep.prepare("npz", str(tmp_path / "d.npz"), str(tmp_path / "png"), shard_size=70, layout="samples",
                 progress=False)
    repack(str(tmp_path / "png"), str(tmp_path / "blk"), shard_size=128, block_size=50, progress=False,
           log=lambda m: None)
    for split in ("train", "val"):
        a, b = load_split_in_memory(str(tmp_path / "png"), split), load_split_in_memory(str(tmp_path / "blk"), split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_flipped_pixel_byte_is_caught_by_the_block_checksum(blocks, tmp_path):
    import shutil
    import tarfile

    d = str(tmp_path / "copy")
    shutil.copytree(blocks, d)
    path = os.path.join(d, "train-000001.tar")
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name == "00000142.x.npy")  # second block of the shard
    with open(path, "r+b") as f:  # one pixel byte, well past the npy header: still a valid array
        f.seek(member.offset_data + 200)
        byte = f.read(1)
        f.seek(member.offset_data + 200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=r"train-000001\.tar: block 00000142: checksum mismatch"):
        load_split_in_memory(d, "train", verify=False)
    s = ShardStream(d, batch_size=B, num_workers=0, mode="exact", shuffle_buffer=0)
    idx = torch.cat([b[2] for b in s.epoch(0)])
    assert s.errors["block"] == 1 and not set(range(142, 174)) & set(idx[~is_padding(idx)].tolist())
