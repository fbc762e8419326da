"""Run logging: JSON-lines metrics, TensorBoard scalars and a progress line with rate and ETA."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

log = logging.getLogger("bype")


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "%(asctime)s %(name)s" + (f"[{rank}]" if rank else "") + " %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception as e:  # tensorboard is optional at run time; JSON lines always work
                log.warning("tensorboard disabled: %s", e)

    def write(self, record: dict, step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("time", "epoch", "step"):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, after_epoch: int) -> None:
    """On resume, drop records of epochs after the checkpoint so no epoch appears twice."""
    records = read_metrics(run_dir)
    keep = [r for r in records if r.get("epoch", 0) <= after_epoch]
    if len(keep) != len(records):
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every `every` steps with rate and ETA."""

    def __init__(self, total: int, desc: str, every: int = 50, enabled: bool = True):
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.n, self.t0 = 0, time.time()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, k: int = 1, **postfix) -> None:
        self.n += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
            if postfix:
                self._bar.set_postfix({a: f"{b:.2f}" for a, b in postfix.items()}, refresh=False)
        elif self.n % self.every == 0 or self.n == self.total:
            rate = self.n / max(time.time() - self.t0, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            extra = " ".join(f"{a}={b:.2f}" for a, b in postfix.items())
            log.info("%s %d/%d %.1f it/s ETA %.0fs %s", self.desc, self.n, self.total, rate, eta, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
