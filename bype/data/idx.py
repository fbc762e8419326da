"""Reader for the IDX format of MNIST and Fashion-MNIST (optionally gzipped)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# File names of the standard distribution, by split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (plain or .gz) into a numpy array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0:
                raise ValueError(f"{path}: not an IDX file (bad magic {header!r})")
            dtype, ndim = header[2], header[3]
            if dtype not in _DTYPES:
                raise ValueError(f"{path}: unknown IDX element type 0x{dtype:02x}")
            shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read IDX file ({e})") from e
    arr = np.frombuffer(data, dtype=_DTYPES[dtype])
    expected = int(np.prod(shape)) if shape else 0
    if arr.size != expected:
        raise ValueError(f"{path}: truncated IDX file: header says {shape}, found {arr.size} elements")
    return arr.reshape(shape).astype(arr.dtype.newbyteorder("="), copy=False)


def find_idx(root: str, name: str) -> str:
    """Locate `name` or `name.gz` under `root`."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{root}: missing IDX file {name}[.gz]")


def load_idx_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of the 'train' or 'test' split under `root`."""
    images_name, labels_name = IDX_FILES[split]
    images = read_idx(find_idx(root, images_name))
    labels = read_idx(find_idx(root, labels_name)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels
