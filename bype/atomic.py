"""Whole-file writes that readers never see half done: a temporary file beside the target, fsync, rename.

A write the disk refuses (full, read-only, permission denied, directory gone) raises `DiskError`: one line
naming the file, the bytes it needed and what was kept. The target is never touched before the new bytes
are on disk, so the previous file (a run's previous checkpoint) stays whole.
"""
from __future__ import annotations

import errno as errnos
import io
import os
import shutil
import tempfile
from typing import Callable, IO, Optional

_FULL = (errnos.ENOSPC, errnos.EDQUOT)
# What a disk answers to a write it refuses (full, read-only, no permission, failing), as opposed to a bug.
FAULTS = (*_FULL, errnos.EROFS, errnos.EACCES, errnos.EPERM, errnos.EIO, errnos.EFBIG)


class DiskError(OSError):
    """A write the disk refused, as one line: `<file>: cannot write N bytes (<reason>); <what was kept>`.
    An OSError (errno and filename as the cause's), so existing `except OSError` keeps working; the command
    line prints it as `bype: error: <line>`."""

    def __init__(self, message: str, err: Optional[int] = None, path: Optional[str] = None,
                 needed: Optional[int] = None):
        super().__init__(message)
        self.message, self.errno, self.filename, self.needed = message, err, path, needed

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # across processes with its own arguments (OSError's would be the bare message)
        return type(self), (self.message, self.errno, self.filename, self.needed)


def disk_error(path: str, cause: OSError, needed: Optional[int], kept: str) -> DiskError:
    """The DiskError of writing `needed` bytes (None: unknown) to `path` that failed with `cause`; `kept` ends
    the line."""
    reason = cause.strerror or type(cause).__name__
    if cause.errno in _FULL:
        try:
            reason += f", {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free:,} bytes free"
        except OSError:
            pass
    what = reason if needed is None else f"cannot write {needed:,} bytes ({reason})"
    return DiskError(f"{path}: {what}; {kept}", cause.errno, path, needed)


def _kept(path: str, keep_previous: Optional[str], what: str) -> str:
    """What survived a failed write: the old file where it was or (after the keep_previous rename) beside it."""
    if os.path.exists(path):
        return f"the previous {what} is kept"
    if keep_previous is not None and os.path.exists(keep_previous):
        return f"the previous {what} is kept as {keep_previous}"
    return f"there was no previous {what}"


def _discard(tmp: Optional[str]) -> None:
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # already gone, or a directory that turned read-only: nothing more to free


def write_bytes_atomic(path: str, data, suffix: str = "", keep_previous: Optional[str] = None,
                       what: str = "file") -> None:
    """Write `data` (bytes-like) to a temporary file beside `path`, fsync it, rename it to `path`: readers see
    the old file or the new one, whole. `keep_previous`: move the old file there first (checkpoints). An
    OSError on the way (disk full, read-only, no permission) leaves `path` as it was and raises DiskError."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)  # frees the space a full disk needs back
        raise disk_error(path, e, memoryview(data).nbytes, _kept(path, keep_previous, what)) from e
    except BaseException:
        _discard(tmp)
        raise


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False, suffix: str = "",
                 keep_previous: Optional[str] = None, what: str = "file") -> None:
    """Run `write(file)` and put what it wrote at `path` atomically (`write_bytes_atomic`). The bytes are
    gathered in memory first: their size is known for the message of a disk that refuses them, and a
    writer like torch.save never sees a failing file (its zip writer then adds a second error)."""
    buf = io.BytesIO() if binary else io.StringIO()
    write(buf)
    data = buf.getbuffer() if binary else buf.getvalue().encode("utf-8")
    write_bytes_atomic(path, data, suffix, keep_previous, what)


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
