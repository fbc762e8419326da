"""What the training loop learns about its steps without making the host wait for the device.

- `EpochStats`: the per-epoch bookkeeping of the trainer: running sums read every `log_every` steps, the
  progress-bar value, and (with `train.sync_debug`) a log line "host syncs between log lines: N".
- `RunningSums`: the loss and its terms summed on the device, step by step; the host reads them (one
  synchronisation) only at log lines and at the end of the epoch. A non-finite loss is remembered on the
  device (its first step and value) and raised at the next read.
- `HostSyncCounter`: counts the host synchronisations between two reads. On CUDA it uses
  `torch.cuda.set_sync_debug_mode("warn")`, which warns at every synchronising call (`.item()`, blocking
  copies, `nonzero`, ...); elsewhere it counts, with torch.profiler, the tensor values read back to the
  host (`.item()`, `bool(t)`, `float(t)`: the calls that synchronise on a GPU), a lower bound of what a
  GPU would see (it misses blocking copies, which do not exist on a CPU).
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch

log = logging.getLogger("bype")
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text for set_sync_debug_mode("warn")
HOST_READ_OP = "aten::_local_scalar_dense"  # what .item(), bool(t) and float(t) run


class RunningSums:
    """Sums of `keys` ("loss" first, then terms of the model's stats dict) since the last `read`."""

    def __init__(self, keys: tuple[str, ...], device: torch.device):
        self.keys = keys
        self.total = torch.zeros(len(keys), dtype=torch.float64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite loss, -1: none
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0

    def add(self, loss: torch.Tensor, stats: dict, step: int) -> None:
        """Add one step's values (device work only)."""
        values = torch.stack([loss.detach().to(torch.float64),
                              *(stats[k].detach().to(torch.float64) for k in self.keys[1:])])
        self.total += values
        first = ~torch.isfinite(values[0]) & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_value = torch.where(first, values[0], self.bad_value)
        self.n += 1

    def read(self, where: str = "") -> tuple[dict, int]:
        """(sums since the last read, steps they cover), then start again; raises FloatingPointError naming
        the first step whose loss was not finite. One host synchronisation."""
        host = torch.cat([self.total, self.bad_step.to(torch.float64)[None], self.bad_value[None]]).tolist()
        if host[-2] >= 0:
            raise FloatingPointError(f"{where}step {int(host[-2])}: loss is {host[-1]}")
        sums, n = dict(zip(self.keys, host[:-2])), self.n
        self.total.zero_()
        self.n = 0
        return sums, n


class HostSyncCounter:
    """`start()` ... `stop() -> count`: the host synchronisations in between (see the module doc)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.method = "torch.cuda.set_sync_debug_mode" if self.cuda else "profiler: values read to the host"
        self._catch: Optional[warnings.catch_warnings] = None
        self._records: list = []
        self._profile = None

    def start(self) -> None:
        if self.cuda:
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profile.__enter__()

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            for w in self._records:  # other warnings are only passed on
                if SYNC_WARNING not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return sum(SYNC_WARNING in str(w.message) for w in self._records)
        self._profile.__exit__(None, None, None)
        return sum(e.name == HOST_READ_OP and _read_by_python(e) for e in self._profile.events())


def _read_by_python(event) -> bool:
    """A value read asked for by Python code (under aten::item / aten::is_nonzero only), not one read inside
    another op's CPU kernel (the CPU fused Adam reads its step count so), which is no GPU sync."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") and parent.name not in ("aten::item", "aten::is_nonzero"):
            return False
        parent = parent.cpu_parent
    return True


class EpochStats:
    """One epoch's statistics: `add(loss, stats, step)` after each step returns the progress-bar values
    (the mean loss since the last log line, at log lines only); `close()` the sums of the whole epoch."""

    def __init__(self, keys: tuple[str, ...], device: torch.device, log_every: int, steps: int,
                 sync_debug: bool = False, where: str = ""):
        self.running = RunningSums(keys, device)
        self.sums = dict.fromkeys(keys, 0.0)
        self.log_every, self.steps, self.where = log_every, steps, where
        self.n = 0
        self.syncs = HostSyncCounter(device) if sync_debug else None
        if self.syncs is not None:
            self.syncs.start()

    def _read(self) -> tuple[dict, int]:
        part, k = self.running.read(self.where)
        self.sums = {key: self.sums[key] + v for key, v in part.items()}
        return part, k

    def add(self, loss: torch.Tensor, stats: dict, step: int) -> dict:
        self.running.add(loss, stats, step)
        self.n += 1
        if self.n % self.log_every and self.n != self.steps:
            return {}
        count = self.syncs.stop() if self.syncs is not None else None
        part, k = self._read()
        if count is not None:
            log.info("host syncs between log lines: %d in %d steps (%s)", count, k, self.syncs.method)
            self.syncs.start()
        return {"loss": part["loss"] / k}

    def close(self) -> dict:
        """The epoch's sums (steps after the last log line included, e.g. after a budget stop)."""
        if self.syncs is not None:
            self.syncs.stop()
            self.syncs = None
        self._read()
        return self.sums
