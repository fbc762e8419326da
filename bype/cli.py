"""The `bype` command line.

  bype train [--config FILE] [key.sub=value ...]     train (no arguments: the embedded default job)
  bype train --resume RUN_DIR [key.sub=value ...]     continue a run exactly where it stopped
  bype train --check [--config FILE | --resume RUN_DIR] [key.sub=value ...]
                                                      validate config, data sizes and run directory; no training
  bype eval RUN_DIR [--samples S]                     importance-sampled test NLL, ELBO, kNN
  bype eval RUN_DIR --priors own,random,exemplar      the test NLL under other priors, networks fixed
  bype sample RUN_DIR [--n N]                         Algorithm 1 samples as an image grid
  bype data prepare DATASET --src PATH --out DIR      write webdataset shards
  bype data repack SRC --out DIR                      one-sample-per-record shards -> block shards
  bype bench NAME [...]                               benchmarks (kernels, coreset, data, scaling, speed)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from typing import Optional


def _subcommand_modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and not m.ispkg)


def _cmd_train(args) -> int:
    from bype.config import load_config
    from bype.train.loop import load_run_config, train

    if args.resume:
        if args.config:
            raise SystemExit("bype: error: --resume takes the config saved in the run directory; drop --config")
        cfg = load_run_config(args.resume, args.overrides)
        cfg.out_dir, cfg.name = os.path.split(os.path.normpath(args.resume))
    else:
        cfg = load_config(args.config, args.overrides)
    resume = bool(args.resume)
    if args.check:
        return _check_train(cfg, resume, args.world_size)
    if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 \
            and os.path.exists(os.path.join(cfg.run_dir, "last.pt")):
        resume = True  # an elastic restart picks up the latest checkpoint by itself
    report = train(cfg, resume=resume)
    if report is not None:
        _print_report(report, cfg.run_dir)
    return 0


def _check_train(cfg, resume: bool, world_size: Optional[int]) -> int:
    """What a start checks before any worker starts (launch/*.sh call this once), reported in one line."""
    from bype.train import checkpoint
    from bype.train.preflight import check_start

    counts = check_start(cfg, resume, world_size)
    if resume:
        path = os.path.join(cfg.run_dir, "last.pt")
        state = checkpoint.load(path)  # truncated or foreign checkpoints stop here
        if world_size is not None:
            checkpoint.check_zero_world(state.get("engine") or {}, world_size, path)
    sizes = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"bype: check passed: {'resume' if resume else 'start'} {cfg.run_dir} ({cfg.prior.kind} prior, "
          f"{cfg.model.arch}, {cfg.data.dataset}: {sizes}; "
          f"{'processes: unknown' if world_size is None else f'{world_size} process' + ('es' if world_size > 1 else '')})")
    return 0


def _positive_options(args, names: tuple) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name}: must be a positive number, got {value}")


def _print_report(report: dict, run_dir: str) -> None:
    keys = ("test_nll", "test_elbo", "bits_per_dim", "knn_5", "epochs", "train_seconds", "stop_reason")
    shown = {k: report[k] for k in keys if k in report}
    print(f"\nrun directory: {run_dir}")
    print("report:", os.path.join(run_dir, "report.json"), json.dumps(shown))
    for k in ("samples_png", "coreset_png", "curves_png"):
        if k in report:
            print(f"{k.replace('_png', '')}: {report[k]}")


def _cmd_eval(args) -> int:
    import logging

    from bype.atomic import write_text_atomic
    from bype.eval.priors import compare_priors, format_table, parse_priors
    from bype.eval.evaluate import evaluate
    from bype.train.metrics import setup_logging
    from bype.parallel.process_group import finish, init_distributed
    from bype.train.loop import load_trained

    log = logging.getLogger("bype")

    _positive_options(args, ("samples", "batch", "limit"))  # --limit 0 would evaluate nothing
    names = parse_priors(args.priors) if args.priors is not None else None
    cfg, data, model = load_trained(args.run_dir, args.checkpoint)
    ctx = init_distributed(cfg)  # under torchrun every rank evaluates its slice of the test set
    setup_logging(ctx.rank)
    model.to(ctx.device)
    memory_mb = args.memory_mb or cfg.eval.memory_mb
    if names is not None:
        report = compare_priors(model, data, names, args.samples, components=cfg.prior.components, seed=cfg.seed,
                                max_rows=args.batch, limit=args.limit, ctx=ctx, log=log.info, memory_mb=memory_mb)
        out, text = os.path.join(args.run_dir, "priors.json"), format_table(report)
    else:
        report = evaluate(model, data.test, data.train_split(), args.samples, args.batch,
                          [] if args.no_knn else cfg.eval.knn_k, limit=args.limit, ctx=ctx, memory_mb=memory_mb)
        out, text = os.path.join(args.run_dir, f"eval_S{args.samples}.json"), json.dumps(report, indent=2)
    if ctx.is_main:
        write_text_atomic(out, json.dumps(report, indent=2) + "\n")
        print(text)
        print(f"written: {out}")
    finish(0)
    return 0


def _cmd_sample(args) -> int:
    from bype.eval.pictures import save_samples
    from bype.train.loop import load_trained

    _positive_options(args, ("n",))
    _, _, model = load_trained(args.run_dir, args.checkpoint)
    out = args.out or os.path.join(args.run_dir, "samples.png")
    print(f"samples: {save_samples(model, out, args.n, args.seed)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bype", description="ByPE-VAE training, evaluation and tooling")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (no arguments: ByPE-VAE on Fashion-MNIST)")
    p.add_argument("--config", help="YAML config file (configs/...)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--check", action="store_true",
                   help="only validate the config, the data sizes and the run directory (one line; exit 2 if bad)")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --check: the processes the run will have (the launchers pass it when they know "
                        "it; without it the checks that need it are left to the workers)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_train)

    for name, func, help_ in (("eval", _cmd_eval, "evaluate a trained run on the test set"),
                              ("sample", _cmd_sample, "generate samples from a trained run")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("run_dir")
        p.add_argument("--checkpoint", choices=("best", "last"), default="best")
        p.set_defaults(func=func)
        if name == "eval":
            p.add_argument("--samples", type=int, default=5000, help="importance samples per example")
            p.add_argument("--batch", type=int, default=50000,
                           help="at most this many examples x samples at once (the memory budget decides below it)")
            p.add_argument("--memory-mb", type=float, default=None,
                           help="memory budget of the evaluation's chunks (default: the run's eval.memory_mb)")
            p.add_argument("--limit", type=int, default=None, help="evaluate the first N test examples")
            p.add_argument("--no-knn", action="store_true", help="skip the kNN accuracy")
            p.add_argument("--priors", default=None, metavar="LIST",
                           help="instead: the test NLL under each prior of a comma-separated list of own, uniform, "
                                "random, kmeans, exemplar, the run's networks fixed (writes priors.json)")
        else:
            p.add_argument("--n", type=int, default=100)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default=None)

    for group, package, help_ in (("data", "bype.data", "data preparation"), ("bench", "bype.bench", "benchmarks")):
        p = sub.add_parser(group, help=help_)
        verbs = p.add_subparsers(dest="verb", required=True)
        names = ["prepare", "repack"] if group == "data" else _subcommand_modules(package)
        for verb in names:
            try:
                module = importlib.import_module(f"{package}.{verb}")
            except ImportError as e:
                verbs.add_parser(verb, help=f"unavailable ({e})")
                continue
            vp = verbs.add_parser(verb, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None)
            module.add_arguments(vp)
            vp.set_defaults(func=module.run)

    for extra, path in (("augment", "bype.experiment.augment"), ("experiment", "bype.experiment")):
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        p = sub.add_parser(extra, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv=None) -> int:
    from bype.atomic import DiskError
    from bype.train.checkpoint import CheckpointError
    from bype.config import ConfigError
    from bype.parallel.process_group import ReplicaMismatchError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, CheckpointError, DiskError, FileExistsError, FileNotFoundError, ValueError,
            ReplicaMismatchError, FloatingPointError) as e:
        if os.environ.get("BYPE_DEBUG"):
            raise
        print(f"bype: error: {e}", file=sys.stderr)
        code = 2
    from bype.parallel.process_group import finish

    finish(code or 0)  # distributed workers end through barrier + destroy + os._exit
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
