"""Training: the loop and everything a run needs around it.

- `loop`: `Trainer` (one readable path for one process, DDP and DeepSpeed), `train`, `load_trained`;
- `engines`, `deepspeed_engine`: how a step runs (one process or DDP; DeepSpeed) behind one interface;
- `optim`: the normalised-gradient Adam of the reference; `compiled_loss`: `train.compile`;
- `checkpoint`: atomic checkpoints that load as data; `rundir`: the run directory's lifecycle;
- `preflight`: the checks a start or resume makes before writing anything;
- `metrics`, `step_stats`: metrics.jsonl, TensorBoard, progress lines, sync-free running sums;
- `cost_estimate`: the start-up estimate of an epoch's and an update's cost.

May import every package below it (kernels, models, data, parallel, coreset, eval); only the CLI, the
benchmarks and the experiments import it.
"""
from bype.train.loop import Trainer, load_run_config, load_trained, train

__all__ = ["Trainer", "load_run_config", "load_trained", "train"]
