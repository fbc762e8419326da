"""Readers for the raw data-set formats `bype data prepare` converts into shards.

Every reader returns a `RawDataset`: per split a `Source` that gives sample `i` as a uint8 image
[C, H, W] and an integer label, plus the image shape and (when known) class names. Sources are
random-access and lazy where the format allows (image files), so preparing a shard reads only its
own samples and a resumed run skips finished shards without decoding anything.

Formats and split conventions (the ones of the ByPE-VAE / Exemplar VAE papers):

- IDX (MNIST, Fashion-MNIST): train = first 50k of the official train set, val = last 10k, test = official 10k.
- CIFAR-10 python pickles (`cifar-10-batches-py/` or `cifar-10-python.tar.gz`): 40k / 10k / 10k the same way
  (val = the last fifth of the training batches, i.e. `data_batch_5`).
- CelebA: `img_align_celeba/` (folder or `.zip`) + `list_eval_partition.txt` (0 train, 1 val, 2 test);
  each image is centre-cropped to a square of side `crop` (or the shorter side when smaller) and resized
  to `size` x `size` RGB. CelebA has no class labels: every label is 0.
- imagefolder: `SRC/{train,val,test}/CLASS/*.png|jpg|...` (any subset of the split folders), or
  `SRC/CLASS/*` taken as the train split. Classes are numbered in sorted name order over all splits.
- npz: arrays `x_train`, `y_train`, `x_val`, ... (or `x`, `y` for a single train split); images [N, H, W],
  [N, H, W, C] or [N, C, H, W] with C in {1, 3}; uint8, or floats in [0, 1] (rounded to 1/255 steps).
  Labels are optional (0 when absent).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .idx import load_idx_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class Source:
    """Random access to one split: `get(i) -> (uint8 [C, H, W], int label)`; `labels` int64 [N]."""

    shape: tuple[int, int, int]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError


class ArraySource(Source):
    """A split held in memory as uint8 [N, C, H, W] (a view: slicing does not copy)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.shape = tuple(int(s) for s in images.shape[1:])

    def get(self, i):
        return self.images[i], int(self.labels[i])


class ImageFileSource(Source):
    """A split of image files, decoded and fitted to a fixed shape on access."""

    def __init__(self, read_bytes, names: list[str], labels, shape, size=None, crop=None):
        self.read_bytes, self.names = read_bytes, names
        self.labels = np.asarray(labels, dtype=np.int64)
        self.shape, self.size, self.crop = tuple(shape), size, crop

    def get(self, i):
        name = self.names[i]
        try:
            img = Image.open(io.BytesIO(self.read_bytes(name)))
            img.load()
        except Exception as e:  # PIL raises several types for broken files
            raise ValueError(f"{name}: cannot decode image ({e})") from e
        x = fit_image(img, self.shape[0], self.size, self.crop)
        if x.shape != self.shape:
            raise ValueError(f"{name}: image shape {list(x.shape)} differs from {list(self.shape)} "
                             f"(pass --size to resize)")
        return x, int(self.labels[i])


@dataclass
class RawDataset:
    splits: dict[str, Source]
    shape: tuple[int, int, int]
    classes: list[str] | None = None
    extra: dict = field(default_factory=dict)


def fit_image(img: Image.Image, channels: int, size: int | None, crop: int | None = None) -> np.ndarray:
    """Convert to L / RGB; with `size`, centre-crop a square (side `crop`, capped by the image) and resize."""
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None:
        w, h = img.size
        side = min(w, h) if not crop else min(crop, w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != size:
            img = img.resize((size, size), Image.Resampling.LANCZOS)
    x = np.asarray(img, dtype=np.uint8)
    return x[None] if x.ndim == 2 else np.ascontiguousarray(x.transpose(2, 0, 1))


def _split_train(images: np.ndarray, labels: np.ndarray, n_val: int, test: tuple) -> dict[str, Source]:
    n_train = len(images) - n_val
    return {
        "train": ArraySource(images[:n_train], labels[:n_train]),
        "val": ArraySource(images[n_train:], labels[n_train:]),
        "test": ArraySource(*test),
    }


# --- IDX (MNIST / Fashion-MNIST) -----------------------------------------------------------------

def read_idx_dataset(root: str) -> RawDataset:
    train_x, train_y = load_idx_split(root, "train")
    test_x, test_y = load_idx_split(root, "test")
    if len(train_x) != 60000:
        raise ValueError(f"{root}: expected 60000 training images, found {len(train_x)}")
    splits = _split_train(train_x[:, None], train_y, 10000, (test_x[:, None], test_y))
    return RawDataset(splits, splits["train"].shape)


# --- CIFAR-10 ------------------------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles: allow only what they contain, so a bad file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} in CIFAR pickle")


def _load_cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise ValueError(f"{name}: not a CIFAR-10 python batch ({e})") from e
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise ValueError(f"{name}: expected b'data' [n, 3072] and n labels, got {list(x.shape)}, {len(y)}")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_reader(src: str):
    """A function name -> bytes over the batch files, from the folder or the .tar.gz."""
    if os.path.isfile(src):
        with tarfile.open(src, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            files = {k: tar.extractfile(m).read() for k, m in members.items()
                     if k.startswith(("data_batch_", "test_batch", "batches.meta"))}
        return lambda name: files[name] if name in files else _missing(src, name)
    folder = src
    if not os.path.exists(os.path.join(folder, "data_batch_1")):
        folder = os.path.join(src, "cifar-10-batches-py")

    def read(name):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            _missing(src, name)
        with open(path, "rb") as f:
            return f.read()
    return read


def _missing(src, name):
    raise FileNotFoundError(f"{src}: missing CIFAR-10 file {name}")


def read_cifar10(src: str) -> RawDataset:
    read = _cifar_reader(src)
    parts = [_load_cifar_batch(read(f"data_batch_{i}"), f"{src}:data_batch_{i}") for i in range(1, 6)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test = _load_cifar_batch(read("test_batch"), f"{src}:test_batch")
    classes = None
    try:
        meta = _SafeUnpickler(io.BytesIO(read("batches.meta")), encoding="bytes").load()
        classes = [c.decode() for c in meta[b"label_names"]]
    except FileNotFoundError:
        pass
    # val = the last fifth of the training batches: the last 10k of the official 50k (40k / 10k / 10k).
    splits = _split_train(train_x, train_y, len(train_x) // 5, test)
    return RawDataset(splits, (3, 32, 32), classes)


# --- CelebA --------------------------------------------------------------------------------------

class _ZipReader:
    """Reads members of a zip; opens it once per process (a handle shared across fork is unsafe)."""

    def __init__(self, path: str):
        self.path, self._pid, self._zip = path, None, None
        with zipfile.ZipFile(path) as z:
            self.members = {os.path.basename(n): n for n in z.namelist() if not n.endswith("/")}

    def __call__(self, name: str) -> bytes:
        if self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        if name not in self.members:
            raise FileNotFoundError(f"{self.path}: no member {name}")
        return self._zip.read(self.members[name])

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}


def _file_reader(folder: str):
    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()
    return read


def read_celeba(src: str, size: int = 64, crop: int | None = 148) -> RawDataset:
    partition = next((p for p in (os.path.join(src, "list_eval_partition.txt"),
                                  os.path.join(src, "Eval", "list_eval_partition.txt")) if os.path.exists(p)), None)
    if partition is None:
        raise FileNotFoundError(f"{src}: missing list_eval_partition.txt")
    folder, archive = os.path.join(src, "img_align_celeba"), os.path.join(src, "img_align_celeba.zip")
    if os.path.isdir(folder):
        nested = os.path.join(folder, "img_align_celeba")  # the official zip unpacks into a nested folder
        read = _file_reader(nested if os.path.isdir(nested) else folder)
    elif os.path.isfile(archive):
        read = _ZipReader(archive)
    else:
        raise FileNotFoundError(f"{src}: missing img_align_celeba/ (folder or .zip)")
    names = {0: [], 1: [], 2: []}
    with open(partition) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{partition}:{lineno}: expected '<file> <0|1|2>', got {line.strip()!r}")
            names[int(parts[1])].append(parts[0])
    shape = (3, size, size)
    splits = {split: ImageFileSource(read, names[code], np.zeros(len(names[code])), shape, size, crop)
              for code, split in enumerate(("train", "val", "test"))}
    return RawDataset(splits, shape, None, {"size": size, "crop": crop})


# --- image folders -------------------------------------------------------------------------------

def _list_classes(root: str) -> dict[str, list[str]]:
    out = {}
    for cls in sorted(os.listdir(root)):
        d = os.path.join(root, cls)
        if os.path.isdir(d):
            out[cls] = sorted(os.path.join(cls, f) for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS))
    return out


def read_imagefolder(src: str, size: int | None = None, channels: int = 3, crop: int | None = None) -> RawDataset:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a directory")
    split_dirs = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(src, s))]
    roots = {s: os.path.join(src, s) for s in split_dirs} or {"train": src}
    listing = {s: _list_classes(r) for s, r in roots.items()}
    classes = sorted({c for per in listing.values() for c in per})
    if not classes:
        raise ValueError(f"{src}: no class folders with images found")
    index = {c: i for i, c in enumerate(classes)}
    if size is None:  # all images must share the first one's size
        first_split = next(s for s in listing if any(listing[s].values()))
        first = next(f for files in listing[first_split].values() for f in files)
        with Image.open(os.path.join(roots[first_split], first)) as img:
            shape = (channels, img.size[1], img.size[0])
    else:
        shape = (channels, size, size)
    splits = {}
    for s, per in listing.items():
        names = [f for c in per for f in per[c]]
        labels = [index[c] for c in per for _ in per[c]]
        splits[s] = ImageFileSource(_file_reader(roots[s]), names, labels, shape, size, crop)
    return RawDataset(splits, shape, classes, {"size": size, "channels": channels})


# --- npz -----------------------------------------------------------------------------------------

def _as_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ValueError(f"{where}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W] with C in 1,3; "
                         f"got {list(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{where}: float images must lie in [0, 1]")
        return np.ascontiguousarray(np.rint(x * 255.0).astype(np.uint8))
    if x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"{where}: integer images must lie in [0, 255]")
    return np.ascontiguousarray(x.astype(np.uint8))


def read_npz(src: str) -> RawDataset:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    keys = {s: (f"x_{s}", f"y_{s}") for s in ("train", "val", "test") if f"x_{s}" in arrays}
    if not keys and "x" in arrays:
        keys = {"train": ("x", "y")}
    if not keys:
        raise KeyError(f"{src}: expected arrays x_train/x_val/x_test (or x), found {sorted(arrays)}")
    splits, shape = {}, None
    for s, (kx, ky) in keys.items():
        x = _as_nchw(arrays[kx], f"{src}:{kx}")
        y = arrays[ky].astype(np.int64).reshape(-1) if ky in arrays else np.zeros(len(x), np.int64)
        if len(y) != len(x):
            raise ValueError(f"{src}: {kx} has {len(x)} images but {ky} has {len(y)} labels")
        if shape is not None and x.shape[1:] != shape:
            raise ValueError(f"{src}: {kx} has image shape {list(x.shape[1:])}, other splits {list(shape)}")
        shape = x.shape[1:]
        splits[s] = ArraySource(x, y)
    return RawDataset(splits, tuple(int(v) for v in shape))
