"""Seeds derived from a few parts (a base seed, an epoch, a step, a name): the same 63-bit number in every
process, on every machine and Python version. Python's `hash()` is not: strings are salted per process,
and the hash of a tuple changed with Python 3.8."""
from __future__ import annotations

import hashlib


def derive_seed(namespace: str, *parts) -> int:
    """blake2b of "namespace/part/part/..." as a 63-bit integer (a valid `torch.Generator` seed)."""
    text = "/".join([namespace, *(str(p) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
