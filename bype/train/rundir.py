"""The run directory, never left changed by a start that fails.

A start (fresh or resumed) writes nothing until every check has passed (configuration, data sizes,
checkpoint, model): then `begin` writes config.yaml and trims metrics.jsonl to the checkpoint. From
there until the run's first checkpoint, a failure (error, Ctrl-C) puts the directory back byte for
byte: what the start created is removed (the directory itself if it created it), config.yaml and
metrics.jsonl get their old bytes back. After a checkpoint the run has made progress and keeps it.
report.json is written only by a run that finished, atomically, so a failing run never replaces it.
A disk that refuses a file of the run (full, read-only, no permission) ends it in one line naming the file
(atomic.DiskError), with the previous checkpoint kept.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Optional

import yaml

from bype.atomic import FAULTS, DiskError, disk_error, write_text_atomic
from bype.parallel.process_group import barrier
from bype.train.metrics import truncate_metrics

log = logging.getLogger("bype")
REWRITTEN = ("config.yaml", "metrics.jsonl")  # existing files a start rewrites before its first checkpoint
CHECKPOINT = "last.pt"  # a new one means the run made progress


def _stat_id(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class _Snapshot:
    """What a directory held: its paths, the bytes of the files a start rewrites, its checkpoint's identity."""

    def __init__(self, path: str):
        self.path = path
        self.existed = os.path.isdir(path)
        self.paths = self._walk() if self.existed else set()
        self.saved = {}
        for name in REWRITTEN:
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    self.saved[name] = f.read()
        self.checkpoint = _stat_id(os.path.join(path, CHECKPOINT))

    def _walk(self) -> set[str]:
        out = set()
        for root, dirs, files in os.walk(self.path):
            out.update(os.path.relpath(os.path.join(root, n), self.path) for n in dirs + files)
        return out

    def progressed(self) -> bool:
        return _stat_id(os.path.join(self.path, CHECKPOINT)) != self.checkpoint

    def restore(self) -> None:
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for rel in sorted(self._walk() - self.paths, reverse=True):  # children before their new parents
            target = os.path.join(self.path, rel)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                os.unlink(target)
        for name, data in self.saved.items():
            with open(os.path.join(self.path, name), "wb") as f:
                f.write(data)


class RunDirectory:
    """Writes of a start to `path` (rank 0 only) and their undoing when the start fails (see `guard`)."""

    def __init__(self, path: str, is_main: bool = True):
        self.path, self.is_main = path, is_main
        self._before: Optional[_Snapshot] = None

    def begin(self, config: dict, epoch: int) -> None:
        """Every check has passed: remember the directory, then write config.yaml and drop the metrics
        records after `epoch` (those of a run that died before its next checkpoint)."""
        if self.is_main:
            self._before = _Snapshot(self.path)
            try:  # a directory that refuses config.yaml (read-only, full) gets its metrics.jsonl back
                os.makedirs(self.path, exist_ok=True)
                truncate_metrics(self.path, epoch)
                write_text_atomic(os.path.join(self.path, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
            except BaseException as e:
                self._restore()
                self._raise_disk_fault(e, "the run directory is as it was")
                raise
        barrier()

    @contextlib.contextmanager
    def guard(self):
        """Around training: a failure before the run's first checkpoint restores the directory. An OSError
        on a file of the run (metrics.jsonl on a file system remounted read-only) becomes one line."""
        try:
            yield
        except BaseException as e:
            restored = self._before is not None and not self._before.progressed()
            if restored:
                self._restore()
            has_checkpoint = os.path.exists(os.path.join(self.path, CHECKPOINT))
            self._raise_disk_fault(e, "the run directory is as it was" if restored or not has_checkpoint
                                   else "the previous checkpoint is kept")
            raise

    def _raise_disk_fault(self, error: BaseException, kept: str) -> None:
        """Raise `error` as a DiskError (one line on the command line) if the disk refused a file of this run.
        Errors that name no file (a full disk seen at a write's flush) are left as they are: the line could
        not say which file."""
        if isinstance(error, DiskError) or not isinstance(error, OSError) or error.errno not in FAULTS \
                or not error.filename:
            return
        root = os.path.abspath(self.path) + os.sep
        if os.path.abspath(os.fsdecode(error.filename)).startswith(root):
            raise disk_error(os.fsdecode(error.filename), error, None, kept) from error

    def _restore(self) -> None:
        """Put the directory back; a disk that refused the run's write may refuse this too, and then the run's
        own error (the one line the user sees) must not be replaced by this one."""
        try:
            self._before.restore()
        except OSError as e:
            log.warning("%s: could not put the run directory back as it was (%s)", self.path, e)
