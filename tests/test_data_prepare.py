"""`bype data prepare`: real Fashion-MNIST, faces in the CelebA layout, CIFAR-10 pickles; statistics; resume."""
import argparse
import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bype.data import prepare as prep
from bype.data.formats import fit_image
from bype.data.idx import load_idx_split
from bype.data.stream import ShardStream, is_padding, load_manifest, load_split_in_memory, manifest_stats

LIMIT = 2000


def t(a):
    return torch.from_numpy(np.array(a))  # a writable copy


def stream_all(out, split, **kw):
    """Every sample of a split streamed once (exact mode, padding dropped): uint8 images and labels by idx."""
    s = ShardStream(out, split=split, batch_size=128, mode="exact", shuffle_buffer=300, **kw)
    xs, ys, ids = [], [], []
    for x, y, idx in s.epoch(0):
        keep = ~is_padding(idx)
        xs.append(x[keep]), ys.append(y[keep]), ids.append(idx[keep])
    idx = torch.cat(ids)
    order = torch.argsort(idx)
    assert torch.equal(idx[order], torch.arange(len(idx))), "not every sample exactly once"
    x = (torch.cat(xs)[order] * 255).round().to(torch.uint8)
    return x, torch.cat(ys)[order]


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory, fmnist_root):
    out = str(tmp_path_factory.mktemp("fmnist"))
    summary = prep.prepare("fashion-mnist", fmnist_root, out, shard_size=700, limit=LIMIT, progress=False)
    assert len(summary["written"]) == 9 and summary["kept"] == []
    return out


def test_fashion_mnist_roundtrip_exact(fmnist_shards, fmnist_root):
    train_x, train_y = load_idx_split(fmnist_root, "train")
    test_x, test_y = load_idx_split(fmnist_root, "test")
    m = load_manifest(fmnist_shards)
    assert m["shape"] == [1, 28, 28] and m["dtype"] == "uint8" and m["labels"] == list(range(10))
    assert {s: e["count"] for s, e in m["splits"].items()} == {"train": LIMIT, "val": LIMIT, "test": LIMIT}
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [700, 700, 600]

    x, y = stream_all(fmnist_shards, "train", num_workers=2)  # DataLoader workers
    assert torch.equal(x[:, 0], t(train_x[:LIMIT])) and torch.equal(y, t(train_y[:LIMIT]))
    # val = the last 10k of the official training set, test = the official test set
    vx, vy = load_split_in_memory(fmnist_shards, "val")
    assert torch.equal(vx[:, 0], t(train_x[50000:50000 + LIMIT]))
    assert torch.equal(vy, t(train_y[50000:50000 + LIMIT]))
    tx, ty = stream_all(fmnist_shards, "test", num_workers=0)
    assert torch.equal(tx[:, 0], t(test_x[:LIMIT])) and torch.equal(ty, t(test_y[:LIMIT]))


def test_manifest_statistics_match_raw_arrays(fmnist_shards, fmnist_root):
    train_x, _ = load_idx_split(fmnist_root, "train")
    test_x, _ = load_idx_split(fmnist_root, "test")
    raw = {"train": train_x[:LIMIT], "val": train_x[50000:50000 + LIMIT], "test": test_x[:LIMIT]}
    m = load_manifest(fmnist_shards)
    for split, arr in raw.items():
        x = arr.reshape(len(arr), -1).astype(np.float64) / 255.0
        stats = m["splits"][split]["stats"]
        assert stats["n"] == len(arr)
        np.testing.assert_allclose(stats["sum_x"], x.sum(0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(stats["sum_sq"], (x ** 2).sum(), rtol=1e-12)
    t = manifest_stats(m, "train")
    assert t["sum_x"].dtype == torch.float64 and t["sum_x"].shape == (784,) and t["n"] == LIMIT


def test_resume_rewrites_only_damaged_shards(tmp_path, fmnist_root):
    out = str(tmp_path / "fm")
    first = prep.prepare("fashion-mnist", fmnist_root, out, shard_size=200, limit=600, splits=["train"],
                         progress=False)
    names = sorted(first["written"])
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    digest = {n: open(os.path.join(out, n), "rb").read() for n in names}

    os.remove(os.path.join(out, "train-000001.tar"))
    with open(os.path.join(out, "train-000002.tar.tmp-99999"), "wb") as f:  # partial shard of a crash
        f.write(b"partial")
    kept_times = stamp_existing(out, names)
    again = prep.prepare("fashion-mnist", fmnist_root, out, shard_size=200, limit=600, splits=["train"],
                         progress=False)
    assert again["written"] == ["train-000001.tar"]
    assert not os.path.exists(os.path.join(out, "train-000002.tar.tmp-99999"))
    for n, t in kept_times.items():
        assert os.stat(os.path.join(out, n)).st_mtime_ns == t, f"{n} was rewritten"

    with open(os.path.join(out, "train-000002.tar"), "r+b") as f:  # corrupt a byte in the middle
        f.seek(5000)
        f.write(b"\xff")
    kept_times = stamp_existing(out, ["train-000000.tar", "train-000001.tar"])
    third = prep.prepare("fashion-mnist", fmnist_root, out, shard_size=200, limit=600, splits=["train"],
                         progress=False)
    assert third["written"] == ["train-000002.tar"]
    for n, t in kept_times.items():
        assert os.stat(os.path.join(out, n)).st_mtime_ns == t, f"{n} was rewritten"
    # deterministic writer: repaired shards are byte-identical to the originals; the manifest too
    assert all(open(os.path.join(out, n), "rb").read() == digest[n] for n in names)
    assert third["manifest"] == first["manifest"]


def stamp_existing(out, names):
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names if os.path.exists(os.path.join(out, n))}


def test_different_output_needs_force(tmp_path, fmnist_root, capsys):
    out = str(tmp_path / "fm")
    prep.prepare("fashion-mnist", fmnist_root, out, shard_size=300, limit=300, splits=["test"], progress=False)
    with pytest.raises(FileExistsError, match="shard_size"):
        prep.prepare("fashion-mnist", fmnist_root, out, shard_size=150, limit=300, splits=["test"], progress=False)
    assert load_manifest(out)["config"]["shard_size"] == 300  # untouched

    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    argv = ["fashion-mnist", "--src", fmnist_root, "--out", out, "--shard-size", "150", "--limit", "300",
            "--splits", "test", "--no-progress"]
    assert prep.run(parser.parse_args(argv)) == 1
    assert "different configuration" in capsys.readouterr().err
    assert prep.run(parser.parse_args(argv + ["--force"])) == 0
    assert "2 shard(s) written" in capsys.readouterr().out
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == ["test-000000.tar", "test-000001.tar"]

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "test-000000.tar").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="without bype metadata"):
        prep.prepare("fashion-mnist", fmnist_root, str(stray), limit=10, splits=["test"], progress=False)


# --- CelebA layout with real faces ----------------------------------------------------------------------

def write_celeba(root, zipped=False):
    from skimage.data import lfw_subset

    faces = (lfw_subset() * 255).round().astype(np.uint8)[:60]  # 25 x 25 grey face crops
    os.makedirs(root, exist_ok=True)
    names, files = [], {}
    for i, face in enumerate(faces):
        rgb = np.stack([face, np.roll(face, 1, 0), face // 2], -1)  # distinct channels
        name = f"{i + 1:06d}" + (".png" if i % 2 else ".jpg")
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG" if i % 2 else "JPEG", quality=95)
        files[name] = buf.getvalue()
        names.append(name)
    if zipped:
        with zipfile.ZipFile(os.path.join(root, "img_align_celeba.zip"), "w") as z:
            for n, data in files.items():
                z.writestr(f"img_align_celeba/{n}", data)
    else:
        os.makedirs(os.path.join(root, "img_align_celeba"))
        for n, data in files.items():
            with open(os.path.join(root, "img_align_celeba", n), "wb") as f:
                f.write(data)
    parts = [0] * 40 + [1] * 10 + [2] * 10
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{n} {p}\n" for n, p in zip(names, parts))
    return names, files


def test_celeba_faces_folder_and_zip(tmp_path):
    names, files = write_celeba(str(tmp_path / "celeba"))
    write_celeba(str(tmp_path / "celeba_zip"), zipped=True)
    out, out_zip = str(tmp_path / "s"), str(tmp_path / "sz")
    prep.prepare("celeba", str(tmp_path / "celeba"), out, shard_size=16, progress=False)
    prep.prepare("celeba", str(tmp_path / "celeba_zip"), out_zip, shard_size=16, progress=False)
    m = load_manifest(out)
    assert m["shape"] == [3, 64, 64] and {s: e["count"] for s, e in m["splits"].items()} == \
        {"train": 40, "val": 10, "test": 10}
    # folder and zip give byte-identical shards
    assert [s["sha256"] for s in m["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in load_manifest(out_zip)["splits"]["train"]["shards"]]

    s = ShardStream(out, split="train", batch_size=8, mode="exact", num_workers=2, shuffle_buffer=50)
    batches = list(s.epoch(0))
    assert len(batches) == len(s) == 5 and all(x.shape == (8, 3, 64, 64) for x, _, _ in batches)
    x = torch.cat([b[0] for b in batches])
    idx = torch.cat([b[2] for b in batches])
    assert sorted(idx.tolist()) == list(range(40)) and 0 <= x.min() and x.max() <= 1
    # each streamed face is the source image centre-cropped and resized (PNG storage is lossless)
    for i in (0, 1, 17):
        want = fit_image(Image.open(io.BytesIO(files[names[i]])), 3, 64, 148)
        got = (x[(idx == i).nonzero()[0, 0]] * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(got, want)
    vx, _ = load_split_in_memory(out, "test")
    want = fit_image(Image.open(io.BytesIO(files[names[50]])), 3, 64, 148)
    assert vx.shape == (10, 3, 64, 64) and np.array_equal(vx[0].numpy(), want)


# --- CIFAR-10 python pickles ----------------------------------------------------------------------------

def write_cifar(folder, per_batch=30, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        arrays[name] = (data, labels)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return arrays


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_pickles(tmp_path, packed):
    arrays = write_cifar(str(tmp_path / "cifar-10-batches-py"))
    src = str(tmp_path)
    if packed:
        src = str(tmp_path / "cifar-10-python.tar.gz")
        with tarfile.open(src, "w:gz") as tar:
            tar.add(str(tmp_path / "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    out = str(tmp_path / "shards")
    prep.prepare("cifar10", src, out, shard_size=50, progress=False)
    m = load_manifest(out)
    assert m["shape"] == [3, 32, 32] and m["classes"] == [f"class{i}" for i in range(10)]
    assert {s: e["count"] for s, e in m["splits"].items()} == {"train": 120, "val": 30, "test": 30}

    train_x = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    train_y = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    x, y = stream_all(out, "train", num_workers=0)
    assert torch.equal(x, torch.from_numpy(train_x[:120])) and torch.equal(y, torch.from_numpy(train_y[:120]))
    vx, vy = load_split_in_memory(out, "val")  # val = data_batch_5
    assert torch.equal(vx, torch.from_numpy(train_x[120:])) and vy.tolist() == arrays["data_batch_5"][1]
    tx, _ = load_split_in_memory(out, "test")
    assert torch.equal(tx.reshape(30, -1), torch.from_numpy(arrays["test_batch"][0]))


def test_cifar_pickle_may_not_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(str(folder), per_batch=2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="data_batch_1.*forbidden"):
        prep.prepare("cifar10", str(tmp_path), str(tmp_path / "out"), progress=False)


# --- npz / imagefolder -----------------------------------------------------------------------------------

def test_npz_and_imagefolder(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:100] * 255 / 16).round().astype(np.uint8)
    np.savez(tmp_path / "d.npz", x_train=images[:80], y_train=digits.target[:80], x_test=images[80:, :, :, None])
    out = str(tmp_path / "npz")
    prep.prepare("npz", str(tmp_path / "d.npz"), out, shard_size=32, progress=False)
    m = load_manifest(out)
    assert m["shape"] == [1, 8, 8] and list(m["splits"]) == ["train", "test"]
    x, y = load_split_in_memory(out, "train")
    assert torch.equal(x[:, 0], torch.from_numpy(images[:80])) and torch.equal(y, torch.from_numpy(digits.target[:80]))

    for split, rows in (("train", range(0, 20)), ("val", range(20, 30))):
        for i in rows:
            d = tmp_path / "folder" / split / f"digit{digits.target[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(d / f"{i:03d}.png")
    out = str(tmp_path / "if")
    prep.prepare("imagefolder", str(tmp_path / "folder"), out, channels=1, progress=False)
    m = load_manifest(out)
    assert m["shape"] == [1, 8, 8] and m["classes"] == sorted(m["classes"]) and len(m["labels"]) == len(m["classes"])
    x, y = load_split_in_memory(out, "val")
    assert x.shape == (10, 1, 8, 8)
    assert sorted(map(bytes, x.numpy().reshape(10, -1))) == sorted(map(bytes, images[20:30].reshape(10, -1)))


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json: manifest is not valid JSON"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "bype-shards", "version": 1}))
    with pytest.raises(ValueError, match=r"manifest.json: manifest lacks key\(s\) dataset"):
        load_manifest(str(tmp_path))
