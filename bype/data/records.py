"""The two record layouts of a shard, and how a raw webdataset record becomes arrays.

`blocks` (what `bype data prepare` writes by default): each record holds up to `block_size` samples as
three `.npy` members sharing one key (`00000256.x.npy` uint8 [n, C, H, W], `00000256.cls.npy` int64 [n],
`00000256.idx.npy` int64 [n]) and `00000256.crc`, the CRC-32 of the three payloads in that order as 8 hex
digits (raw pixels have no checksum of their own, unlike PNG: without it a flipped byte would pass);
the key is the first sample's index. One tar header and one `np.load`
per block instead of three headers and one image decode per sample: webdataset's per-member cost
(about 140 us of Python here) is paid once per `block_size` samples.

`samples` (the webdataset convention, and `prepare --layout samples`): one record per sample, an image
member (`png`, `jpg`, ...) plus optional `cls` and `idx` as decimal text. Readable from any tool's
shards; `bype data repack` converts them into blocks.

Every decoder returns a chunk `(x uint8 [n, C, H, W], y int64 [n], idx int64 [n])` or raises ValueError
saying what is broken.
"""
from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

LAYOUTS = ("blocks", "samples")
DEFAULT_BLOCK_SIZE = 256
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp")
BLOCK_FIELDS = ("x.npy", "cls.npy", "idx.npy")

Chunk = tuple  # (x uint8 [n, C, H, W], y int64 [n], idx int64 [n])


def _first_arg(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode_block(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> dict[str, bytes]:
    """Tar members (field -> bytes) of one block record."""
    members = {"x.npy": _npy_bytes(x.astype(np.uint8, copy=False)), "cls.npy": _npy_bytes(y.astype(np.int64)),
               "idx.npy": _npy_bytes(idx.astype(np.int64))}
    return {**members, "crc": f"{_crc(members):08x}".encode()}


def _crc(record: dict) -> int:
    crc = 0
    for field in BLOCK_FIELDS:
        crc = zlib.crc32(record[field], crc)
    return crc


_HEADERS: dict[bytes, tuple] = {}  # npy header -> (dtype, shape, fortran order, payload offset)


def _load_npy(data: bytes, field: str) -> np.ndarray:
    """A read-only array over the bytes of an .npy member. numpy parses a header with `ast.literal_eval`
    (about 0.2 ms); blocks of one shard share a handful of headers, so each is parsed once."""
    try:
        if data[:6] != b"\x93NUMPY" or data[6] != 1:  # version 1.0: what np.save writes for our arrays
            return np.load(io.BytesIO(data), allow_pickle=False)
        end = 10 + int.from_bytes(data[8:10], "little")
        header = data[:end]
        if header not in _HEADERS:
            f = io.BytesIO(data)
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            if dtype.hasobject:
                raise ValueError("object arrays are not allowed")
            _HEADERS[header] = (dtype, shape, fortran, end)
        dtype, shape, fortran, end = _HEADERS[header]
        a = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=end)
        return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    except Exception as e:  # numpy raises several types on a damaged header or payload
        raise ValueError(f"broken {field} ({type(e).__name__}: {_first_arg(e)})") from e


def decode_block(record: dict, shape: tuple | None) -> Chunk:
    """The chunk of one block record; ValueError when a field is missing, damaged or inconsistent."""
    missing = [f for f in BLOCK_FIELDS if f not in record]
    if missing:
        raise ValueError(f"block lacks {', '.join(missing)}")
    if "crc" in record and record["crc"] != f"{_crc(record):08x}".encode():  # blocks of other tools may lack it
        raise ValueError("checksum mismatch (damaged block)")
    x = _load_npy(record["x.npy"], "x.npy")
    y, idx = _load_npy(record["cls.npy"], "cls.npy"), _load_npy(record["idx.npy"], "idx.npy")
    if x.dtype != np.uint8 or x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != tuple(shape)):
        want = f"uint8 [n, {', '.join(map(str, shape))}]" if shape is not None else "uint8 [n, C, H, W]"
        raise ValueError(f"block images are {x.dtype} {list(x.shape)}, expected {want}")
    if y.shape != (len(x),) or idx.shape != (len(x),) or y.dtype.kind != "i" or idx.dtype.kind != "i":
        raise ValueError(f"block labels {list(y.shape)} / indices {list(idx.shape)} do not match its {len(x)} images")
    return x, y.astype(np.int64, copy=False), idx.astype(np.int64, copy=False)


def decode_image(data: bytes, field: str, channels: int | None) -> np.ndarray:
    """uint8 [C, H, W] of an encoded image; grey or RGB as `channels` asks (as stored when None)."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.mode not in ("L", "RGB") or (channels is not None and img.mode != ("L" if channels == 1 else "RGB")):
            img = img.convert("L" if channels == 1 or (channels is None and img.mode in ("1", "I", "F", "LA"))
                              else "RGB")
        x = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises many types on broken data
        raise ValueError(f"broken {field} image ({type(e).__name__}: {_first_arg(e)})") from e
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


def decode_sample(record: dict, shape: tuple | None) -> tuple[np.ndarray, int, int]:
    """(uint8 [C, H, W], label, idx) of a one-sample record; ValueError when broken."""
    field = next((f for f in IMAGE_FIELDS if f in record), None)
    if field is None:
        raise ValueError(f"no image field (has {sorted(k for k in record if not k.startswith('__'))})")
    x = decode_image(record[field], field, shape[0] if shape is not None else None)
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"image shape {list(x.shape)}, expected {list(shape)}")
    try:
        y = int(record["cls"]) if "cls" in record else -1
        idx = int(record["idx"]) if "idx" in record else -1
    except ValueError as e:
        raise ValueError(f"bad cls/idx field ({e})") from e
    return x, y, idx


def stack_samples(items: list[tuple[np.ndarray, int, int]]) -> Chunk:
    """One chunk out of decoded samples."""
    return (np.stack([it[0] for it in items]), np.array([it[1] for it in items], dtype=np.int64),
            np.array([it[2] for it in items], dtype=np.int64))


def record_layout(record: dict) -> str:
    """'blocks' or 'samples', from a record's fields (shards made by other tools carry no manifest)."""
    return "blocks" if "x.npy" in record else "samples"
