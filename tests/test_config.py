import subprocess
import sys

import pytest

from bype.config import ConfigError, load_config

CONFIGS = "configs"


def test_defaults_are_the_main_job():
    cfg = load_config()
    assert (cfg.prior.kind, cfg.model.arch, cfg.prior.components, cfg.data.dataset) == ("bype", "vae", 500, "fashion-mnist")


def test_every_shipped_config_loads():
    import glob

    datasets = ("fashion-mnist", "mnist", "cifar10", "celeba")
    paths = [p for d in datasets for p in glob.glob(f"{CONFIGS}/{d}/*.yaml")]
    assert len(paths) == 48  # 4 data sets x 3 architectures x 4 priors
    for path in paths:
        cfg = load_config(path)
        assert cfg.name.endswith(path.rsplit("/", 1)[1][:-5]) and cfg.train.epochs == 4000 and cfg.eval.is_samples == 5000
    cfg = load_config(f"{CONFIGS}/cifar10/convhvae-bype.yaml")
    assert (cfg.model.likelihood, cfg.model.arch, cfg.data.source) == ("logistic", "convhvae", "shards")


def test_overrides_apply_with_yaml_types():
    cfg = load_config(f"{CONFIGS}/fashion-mnist/vae-bype.yaml", ["train.lr=0.001", "coreset.every=5",
                                                                  "train.max_minutes=null", "eval.knn_k=[3,5]"])
    assert cfg.train.lr == 0.001 and cfg.coreset.every == 5 and cfg.train.max_minutes is None
    assert cfg.eval.knn_k == [3, 5]


def test_exponent_notation_is_a_number_in_overrides_and_files(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; float keys take it as the number people mean
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    p = tmp_path / "lr.yaml"
    p.write_text("train:\n  lr: 5E-4\n")
    assert load_config(str(p)).train.lr == 5e-4
    with pytest.raises(ConfigError, match="train.lr: expected a number, got '1e-3x'"):
        load_config(None, ["train.lr=1e-3x"])
    with pytest.raises(ConfigError, match="model.hidden: expected an integer"):
        load_config(None, ["model.hidden=1e2"])  # integers stay integers


@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", "train.epochs: must be > 0"),
    ("train.epoch=3", "train.epoch: unknown key"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("prior.kind=flow", "prior.kind: 'flow' is not one of"),
    ("model.hidden=1.5", "model.hidden: expected an integer"),
    ("coreset.samples=1", "coreset.samples: needs at least 2"),
    ("bogus", "bogus: override must look like key.sub=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(str(p))
    p.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_reports_one_line_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bype.cli", "train", "train.epochs=-3", f"out_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "bype: error: train.epochs: must be > 0, got -3"
    assert not list(tmp_path.iterdir())  # nothing was written
