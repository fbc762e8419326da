"""Typed run configuration: dataclass schema, YAML loading with `base:` inheritance, dotted overrides.

Every field has a default, so `bype train` with no config runs the embedded default job: ByPE-VAE on
Fashion-MNIST sized for 10 minutes on 2 CPU cores (a 5.5-minute training budget, short warm-up, S = 500
for the test NLL). `configs/base.yaml` restores the paper's full-length settings. Unknown keys,
wrong types and impossible values raise `ConfigError` with one line naming the key, before any work
(sizes against the data the run reads: bype.train.preflight).
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass
class StreamConfig:
    mode: str = "resample"  # resample: fixed epoch length; exact: every sample once per epoch (padded)
    samples_per_epoch: Optional[int] = None  # resample mode; default = the split's size
    shuffle_buffer: int = 5000
    on_error: str = "skip"  # skip | raise
    verify: bool = True  # check the shards' sha256 at start-up; false: train on, skipping unreadable data


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | cifar10 | celeba
    source: str = "memory"  # memory (IDX files read whole) | shards (webdataset, see data.shards)
    root: Optional[str] = None  # IDX folder for memory; default per dataset
    shards: Optional[str] = None  # prepared shard directory or spec for source=shards
    train_limit: Optional[int] = None  # use only the first n training examples (quick runs)
    eval_limit: Optional[int] = None  # use only the first n validation / test examples
    num_workers: int = 0
    stream: StreamConfig = field(default_factory=StreamConfig)


@dataclass
class ModelConfig:
    arch: str = "vae"  # vae | hvae | convhvae
    likelihood: str = "bernoulli"  # bernoulli | logistic | gaussian
    latent_dim: int = 40
    hidden: int = 300
    gaussian_std: float = 0.1  # fixed decoder std for the gaussian likelihood


@dataclass
class ExemplarConfig:
    subset: int = 25000  # exemplars drawn per minibatch (0 = all)
    knn: int = 0  # >0: keep only the k nearest exemplars of each z (retrieval mode)


@dataclass
class PriorConfig:
    kind: str = "bype"  # gaussian | vampprior | exemplar | bype
    components: int = 500  # M pseudodata (bype) or K pseudo-inputs (vampprior)
    log_var_init: float = 0.0  # initial log s2 of the shared component variance (bype, exemplar)
    exemplar: ExemplarConfig = field(default_factory=ExemplarConfig)


@dataclass
class CoresetConfig:
    every: int = 5  # update the pseudocoreset every k epochs (paper: 10; configs/base.yaml)
    samples: Optional[int] = None  # z samples per step (S); default M
    batch_size: int = 100  # data minibatch per step (minibatch data term)
    steps: Optional[int] = None  # steps per update; default N / batch_size
    schedule: str = "scaled"  # scaled: Adam on log w and on U in units of the data range | reference
    lr: Optional[float] = None  # step on w: scaled 0.05 (on log w), reference 0.5 / (j + 1) (docs/CORESET.md)
    lr_u: Optional[float] = None  # step on U: scaled 0.01 x data range, reference 0.05 / (j + 1)
    safeguard: bool = True  # roll back an update that leaves the held-out ½Var(R) worse
    data_term: str = "auto"  # auto | exact | minibatch
    # posterior: the paper's KL(pi_Uw || pi_X) (eq. 17); exemplar: the cross-entropy of the coreset prior
    # to the Exemplar prior (docs/CORESET.md says when each can move the coreset)
    objective: str = "posterior"


@dataclass
class TrainConfig:
    epochs: int = 4000
    batch_size: int = 100
    lr: float = 5e-4
    optimizer: str = "normalized_adam"  # normalized_adam | adam
    warmup_epochs: int = 5  # KL warm-up: beta = min(1, epoch / warmup_epochs) (paper: 100)
    patience: int = 50  # early stopping on validation loss, counted after warm-up
    max_minutes: Optional[float] = 5.5  # wall-clock training budget; stops after the epoch that crosses it
    grad_clip: Optional[float] = None
    log_every: int = 50  # steps between progress log lines
    profile: bool = False  # write a torch.profiler trace of a few steps
    # torch.compile of the loss: null = auto (CPU runs of >= 60 minutes or unbudgeted; not CUDA, not the
    # exemplar prior: see docs/ARCHITECTURE.md), true / false to force (bype/train/compiled_loss.py); engines none
    # and ddp (DeepSpeed runs eagerly and says so)
    compile: Optional[bool] = None
    compile_mode: str = "auto"  # auto (reduce-overhead = CUDA graphs on CUDA, default elsewhere) | a torch mode
    sync_debug: bool = False  # count host synchronisations between log lines and log them
    cost_estimate: bool = True  # time a training step and a coreset step at start-up; log epoch / update cost


@dataclass
class EvalConfig:
    is_samples: int = 500  # importance samples per test example (paper: 5000; `bype eval` default 5000)
    memory_mb: float = 2048  # memory budget of evaluation's chunks (bype/memory.py), beside the model
    is_batch: int = 50000  # upper bound on examples x samples in one chunk; the memory budget decides below it
    knn_k: list = field(default_factory=lambda: [3, 5, 7, 9, 11, 13, 15])
    n_samples_grid: int = 100  # images in samples.png
    at_end: bool = True  # run the test evaluation after training


@dataclass
class DistConfig:
    engine: str = "none"  # none | ddp | deepspeed
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast, every engine) | fp16 (deepspeed only, on GPU)
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON/YAML file merged over the generated one
    shard_prior: bool = True  # several ranks: each encodes its share of the prior's mixture rows (docs/DISTRIBUTED.md)


@dataclass
class Config:
    name: str = "bype-vae-fashion-mnist"
    seed: int = 0
    out_dir: str = "runs"  # the run directory is out_dir/name
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)


CHOICES = {
    "data.dataset": ("fashion-mnist", "mnist", "cifar10", "celeba"),
    "data.source": ("memory", "shards"),
    "data.stream.mode": ("resample", "exact"),
    "data.stream.on_error": ("skip", "raise"),
    "model.arch": ("vae", "hvae", "convhvae"),
    "model.likelihood": ("bernoulli", "logistic", "gaussian"),
    "prior.kind": ("gaussian", "vampprior", "exemplar", "bype"),
    "coreset.data_term": ("auto", "exact", "minibatch"),
    "coreset.schedule": ("scaled", "reference"),
    "coreset.objective": ("posterior", "exemplar"),
    "train.optimizer": ("normalized_adam", "adam"),
    "train.compile_mode": ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "dist.engine": ("none", "ddp", "deepspeed"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "dist.precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
}

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the annotated type, allowing int -> float and None for Optional."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string; it needs 1.0e-3
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typ is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    """Write the nested dict `data` into the dataclass `obj`, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(type(obj))
    for key, value in data.items():
        full = prefix + str(key)
        if key not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"{full}: unknown key (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, types[key]))


def read_yaml_mapping(path: str, key: str = "") -> dict:
    """A YAML (or JSON) file holding a mapping; errors name the config `key` that gave the path, if any."""
    where = f"{key}: {path}" if key else path
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    return data


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    """Read a YAML file, resolving `base:` (a path or a list of paths relative to the file, applied in
    order, the file itself last) recursively."""
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    data = read_yaml_mapping(path)
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_update(merged, _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,)))
    return deep_update(merged, data)


def deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with the value parsed as YAML (so 3, 0.5, true, null, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"{item}: override must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file (with base chain) <- dotted overrides; then validate."""
    return config_from_dict(_read_yaml(path) if path else {}, overrides)


def config_from_dict(data: dict, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- a nested dict (e.g. a run's saved config.yaml) <- dotted overrides; then validate."""
    cfg = Config()
    _merge(cfg, data)
    for item in overrides or []:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> None:
    """Impossible values, each reported as one line naming the key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")

    def positive(key: str, allow_zero: bool = False, allow_none: bool = False) -> None:
        value = _get(cfg, key)
        if value is None and allow_none:
            return
        if value is None or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{key}: must be {bound}, got {value!r}")

    for key in ("train.epochs", "train.batch_size", "train.lr", "model.latent_dim", "model.hidden",
                "prior.components", "coreset.every", "coreset.batch_size",
                "eval.is_samples", "eval.is_batch", "eval.memory_mb", "train.log_every", "model.gaussian_std",
                "data.stream.shuffle_buffer"):
        positive(key)
    for key in ("train.warmup_epochs", "train.patience", "data.num_workers", "prior.exemplar.subset",
                "prior.exemplar.knn", "eval.n_samples_grid"):
        positive(key, allow_zero=True)
    for key in ("coreset.samples", "coreset.steps", "coreset.lr", "coreset.lr_u", "train.max_minutes", "data.train_limit",
                "data.eval_limit", "data.stream.samples_per_epoch", "train.grad_clip"):
        positive(key, allow_none=True)
    if cfg.coreset.samples is not None and cfg.coreset.samples < 2:
        raise ConfigError(f"coreset.samples: needs at least 2 samples for a covariance, got {cfg.coreset.samples}")
    if not 0 <= cfg.dist.zero_stage <= 3:
        raise ConfigError(f"dist.zero_stage: must be 0..3, got {cfg.dist.zero_stage}")
    if any((not isinstance(k, int)) or k <= 0 for k in cfg.eval.knn_k):
        raise ConfigError(f"eval.knn_k: must be a list of positive integers, got {cfg.eval.knn_k!r}")

    # Sizes against the data (M <= N, ...) are checked by bype.train.preflight, which reads the actual counts.
    binary = cfg.data.dataset in ("mnist", "fashion-mnist")
    if cfg.model.likelihood == "bernoulli" and not binary:
        raise ConfigError(f"model.likelihood: bernoulli needs binary data; {cfg.data.dataset} is 8-bit colour "
                          "(use logistic)")
    if cfg.data.source == "shards" and not cfg.data.shards:
        raise ConfigError("data.shards: required when data.source is shards (a prepared shard directory)")
    if cfg.data.source == "shards" and cfg.data.train_limit is not None:
        raise ConfigError("data.train_limit: applies to data.source=memory; for shards prepare a subset "
                          "(`bype data prepare ... --limit N`)")
    if cfg.data.source == "memory" and cfg.data.dataset in ("cifar10", "celeba"):
        raise ConfigError(f"data.source: {cfg.data.dataset} streams from shards; set data.source=shards and "
                          "data.shards=DIR (see `bype data prepare`)")
    if cfg.dist.engine != "deepspeed" and cfg.dist.precision == "fp16":
        raise ConfigError("dist.precision: fp16 needs dist.engine=deepspeed (loss scaling); use bf16")
