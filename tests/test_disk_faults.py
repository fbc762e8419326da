"""A fault on the disk ends the run in one line (`bype: error: ...`, exit 2, no traceback) that names the file,
and the previous checkpoint stays whole: a full disk at a checkpoint (the line gives the bytes it needed, and
`--resume` then continues exactly), a run directory that turns read-only, a shard directory that vanishes
mid-epoch. Real tiny runs on Fashion-MNIST; the errors of a full disk and of a read-only file system are
simulated (they need mounts), and so is a read-only directory when running as root (who writes anyway)."""
import errno
import json
import os
import re
import shutil
import tempfile

import pytest

from bype.train import checkpoint
from bype.train import loop as trainer
from bype.cli import main
from bype.data import prepare as prep
from tests.helpers import TINY

RUN = [*TINY, "prior.kind=gaussian", "train.epochs=3"]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("bype: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.out + captured.err
    return err[len("bype: error: "):]


def temp_files(run_dir):
    return [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]


def test_full_disk_at_a_checkpoint_is_one_line_and_resume_continues(tmp_path, fmnist_root, capsys, monkeypatch):
    assert main(["train", f"out_dir={tmp_path}", "name=reference", *RUN]) == 0
    run = str(tmp_path / "full")
    written, needed = [], []  # checkpoint files that reached fsync; the sizes of those the disk refused
    real_fsync = os.fsync

    def fsync(fd):
        """The disk fills up after epoch 1's two checkpoints: from the third on, the data of a checkpoint's
        temporary file does not reach the disk (ENOSPC, as write or fsync report it)."""
        ino = os.fstat(fd).st_ino
        if os.path.isdir(run) and any(e.inode() == ino and e.name.endswith(".pt") for e in os.scandir(run)):
            written.append(ino)
            if len(written) > 2:
                needed.append(os.fstat(fd).st_size)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["train", f"out_dir={tmp_path}", "name=full", *RUN]) == 2
    err = one_line_error(capsys)
    assert re.fullmatch(rf"{re.escape(run)}/(best|last)\.pt: cannot write {needed[0]:,} bytes \(No space left on "
                        r"device, [\d,]+ bytes free\); the previous checkpoint is kept", err), err
    monkeypatch.undo()

    # Epoch 1's checkpoints are whole; no temporary file is left to fill the disk.
    assert checkpoint.load(os.path.join(run, "last.pt"))["epoch"] == 1
    assert checkpoint.load(os.path.join(run, "best.pt"))["epoch"] == 1
    assert temp_files(run) == []
    # Space again: the resumed run redoes epoch 2 and goes on as if nothing had happened.
    assert main(["train", "--resume", run]) == 0
    reference = metrics(str(tmp_path / "reference"))
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
    assert [r["val_loss"] for r in metrics(run)] == [r["val_loss"] for r in reference]


def make_unwritable(path, monkeypatch):
    """chmod a-w; as root, who writes anyway, files that the directory would refuse raise EACCES instead."""
    os.chmod(path, 0o555)
    if os.geteuid() != 0:
        return
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == os.path.abspath(path) and not os.stat(path).st_mode & 0o200:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_run_directory_that_turns_read_only_is_one_line(tmp_path, fmnist_root, capsys, monkeypatch):
    run = str(tmp_path / "ro")
    real_save, saves = checkpoint.save, []

    def save(state, path):
        saves.append(path)
        if len(saves) == 3:  # after epoch 1's checkpoints: the run directory is remounted read-only, say
            make_unwritable(run, monkeypatch)
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save", save)
    try:
        assert main(["train", f"out_dir={tmp_path}", "name=ro", *RUN]) == 2
        err = one_line_error(capsys)
        assert re.fullmatch(rf"{re.escape(saves[-1])}: cannot write [\d,]+ bytes \(Permission denied\); "
                            r"the previous checkpoint is kept", err), err
        assert checkpoint.load(os.path.join(run, "last.pt"))["epoch"] == 1

        # A resume into the still read-only directory stops at its first write, leaving it as it was.
        before = {n: open(os.path.join(run, n), "rb").read() for n in ("config.yaml", "metrics.jsonl", "last.pt")}
        assert main(["train", "--resume", run]) == 2
        err = one_line_error(capsys)
        assert err.startswith(f"{run}/config.yaml: cannot write ") and "(Permission denied)" in err, err
        assert {n: open(os.path.join(run, n), "rb").read() for n in before} == before
    finally:
        os.chmod(run, 0o755)
    monkeypatch.undo()
    assert main(["train", "--resume", run]) == 0
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


def test_file_system_remounted_read_only_mid_run_is_one_line(tmp_path, fmnist_root, capsys, monkeypatch):
    from bype.train import metrics as metrics_module

    run = str(tmp_path / "rofs")
    log = os.path.join(run, "metrics.jsonl")
    appends = []

    def open_(file, mode="r", *args, **kwargs):
        """The file system turns read-only after epoch 1: the next append to metrics.jsonl is refused."""
        if os.fspath(file) == log and mode == "a":
            appends.append(mode)
            if len(appends) > 1:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), log)
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", open_, raising=False)  # bype.train.metrics' own calls only
    assert main(["train", f"out_dir={tmp_path}", "name=rofs", *RUN]) == 2
    assert one_line_error(capsys) == f"{log}: Read-only file system; the previous checkpoint is kept"
    assert checkpoint.load(os.path.join(run, "last.pt"))["epoch"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", run]) == 0
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fmnist_root):
    out = str(tmp_path_factory.mktemp("shards") / "shards")
    prep.prepare("fashion-mnist", fmnist_root, out, shard_size=250, limit=1000, progress=False)
    return out


@pytest.mark.parametrize("mode", ["exact", "resample"])
def test_shard_directory_vanishing_mid_epoch_is_one_line(tmp_path, shards, capsys, monkeypatch, mode):
    data = str(tmp_path / "shards")
    shutil.copytree(shards, data)
    real_batches = trainer.device_batches

    def batches(loader, epoch, device):
        for i, batch in enumerate(real_batches(loader, epoch, device)):
            if (epoch, i) == (2, 1):
                shutil.rmtree(data)  # deleted (or unmounted) while epoch 2 reads it
            yield batch

    monkeypatch.setattr(trainer, "device_batches", batches)
    # A small shuffle buffer: the epoch reads its four shards one after another, not all before its first batch.
    assert main(["train", f"out_dir={tmp_path}", "name=run", *RUN, "data.source=shards", f"data.shards={data}",
                 "data.train_limit=null", "data.num_workers=0", f"data.stream.mode={mode}",
                 "data.stream.shuffle_buffer=100"]) == 2
    err = one_line_error(capsys)
    assert re.fullmatch(rf"{re.escape(data)}: the shard directory vanished while epoch 2 was read "
                        r"\(train-\d+\.tar is gone\); the shards must stay in place for the whole run", err), err
    assert checkpoint.load(str(tmp_path / "run" / "last.pt"))["epoch"] == 1
