"""Whole-file writes that readers never see half done: a temporary file beside the target, fsync, rename."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO, Optional


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False, suffix: str = "",
                 keep_previous: Optional[str] = None) -> None:
    """Run `write(file)` on a temporary file beside `path`, fsync it, and rename it to `path`: readers see
    the old file or the new one, whole. `keep_previous`: move the old file there first (checkpoints)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    write_atomic(path, lambda f: f.write(text))
