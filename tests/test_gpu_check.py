"""launch/gpu-check.sh on a machine without a GPU: the dry run, and the summary it would write."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bype.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_step_and_checks_the_environment(fmnist_root):
    env = {**os.environ, "PYTHON": sys.executable, "BYPE_FMNIST_ROOT": fmnist_root}
    p = subprocess.run(["bash", "launch/gpu-check.sh", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for step in gpu_check.plan(Path("out"), fmnist_root):
        assert f"[{step.name}]" in p.stdout
    assert "problem:" not in p.stdout
    assert ("no CUDA device here" in p.stdout) != ("CUDA device present" in p.stdout)


def test_dry_run_names_missing_data(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "FMNIST_CANDIDATES", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("BYPE_FMNIST_ROOT", raising=False)
    monkeypatch.chdir(ROOT)
    assert gpu_check.main(["--dry-run"]) == 1


def test_unknown_step_is_one_line_error():
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--dry-run", "--only", "kernel_tset"])


def _write_run(root: Path, name: str, val_losses, ms_per_step):
    run = root / "runs" / name
    run.mkdir(parents=True)
    lines = [json.dumps(dict(epoch=i + 1, train_loss=v + 1, val_loss=v, steps=100,
                             step_seconds=ms_per_step / 10)) for i, v in enumerate(val_losses)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_training_comparison_and_summary(tmp_path):
    _write_run(tmp_path, "triton", [300.0, 260.0, 250.0], 12.0)
    _write_run(tmp_path, "torch", [300.0, 260.13, 250.0], 15.0)  # 5e-4 apart at epoch 2
    results = {n: dict(name=n, what="", argv=[], rc=0, seconds=1.0, **gpu_check.parse(n, "", tmp_path))
               for n in ("train_triton", "train_torch")}
    cmp_ = gpu_check.compare_training(results)
    assert cmp_["common_epochs"] == 3
    assert cmp_["max_rel_val_diff"] == pytest.approx(0.13 / 260.13)
    assert cmp_["equal_within_1e3"]
    assert cmp_["ms_per_step_triton"] == pytest.approx(12.0) and cmp_["ms_per_step_torch"] == pytest.approx(15.0)
    md = gpu_check.summary_markdown(results, dict(date="today", training_comparison=cmp_))
    assert "3 common epochs" in md and "triton 12.0" in md


def test_triton_ratios_against_each_baseline():
    rows = [dict(impl=i, passes="fwdbwd", B=8, M=16, d=4, time_s=t)
            for i, t in (("naive", 4e-3), ("compiled", 2e-3), ("triton", 1e-3))]
    (line,) = gpu_check.triton_ratios(rows)
    assert "naive 4.00x" in line and "compiled 2.00x" in line


def test_split_rule_comparison_line():
    def rows(ms):
        return [dict(impl="triton", passes=p, B=1024, M=50000, d=40, time_s=ms * 1e-3 * k)
                for p, k in (("fwd", 1), ("fwdbwd", 3))]
    results = {"bench_kernels_large": {"rows": rows(1.0)}, "bench_kernels_split_programs": {"rows": rows(1.5)}}
    lines = gpu_check.split_rule_lines(results)
    assert "- triton fwdbwd B=1024 M=50000 d=40: whole waves 3.000 ms, program count 4.500 ms (1.50x)" in lines
    assert gpu_check.split_rule_lines({"bench_kernels_large": {"rows": rows(1.0)}}) == []


def test_split_rule_knob(monkeypatch):
    from kernels import tiling

    target = tiling.cuda_target(90)
    monkeypatch.setenv(tiling.SPLIT_ENV, "programs")
    assert tiling.split(782, 16, target, 2) == tiling.split(782, 16, target) == (17, 46)
    monkeypatch.setenv(tiling.SPLIT_ENV, "waves")
    assert tiling.split(782, 16, target, 2) == (33, 24)
    monkeypatch.setenv(tiling.SPLIT_ENV, "wave")
    with pytest.raises(ValueError, match="BYPE_KERNEL_SPLIT='wave': expected 'waves' or 'programs'"):
        tiling.split(782, 16, target, 2)


def test_each_benchmark_step_reads_its_own_output(tmp_path):
    """Every `bype bench kernels` step is parsed from its own folder (the split-rule step once read the
    training step's rows and compared B=100 times with B=1024 ones); the plan A/B pairs equal shapes."""
    steps = {s.name: s for s in gpu_check.plan(tmp_path, None)}
    for i, (name, folder) in enumerate(gpu_check.BENCH_DIRS.items()):
        assert str(tmp_path / folder) in steps[name].argv
        (tmp_path / folder).mkdir()
        rows = [dict(impl="triton", passes="fwdbwd", B=100, M=500, d=40, time_s=(i + 1) * 1e-4)]
        (tmp_path / folder / "kernels.json").write_text(json.dumps(dict(meta={}, rows=rows)))
    parsed = {name: gpu_check.parse(name, "", tmp_path) for name in gpu_check.BENCH_DIRS}
    assert [p["rows"][0]["time_s"] for p in parsed.values()] == pytest.approx(
        [(i + 1) * 1e-4 for i in range(len(gpu_check.BENCH_DIRS))])
    assert steps["bench_kernels_training_split"].env["BYPE_MIXTURE_PLAN"] == "split"
    lines = gpu_check.plan_lines(parsed)
    assert "- triton fwdbwd B=100 M=500 d=40: fused 0.200 ms, split 0.400 ms (2.00x)" in lines


def test_accuracy_step_runs_on_the_interpreter(tmp_path):
    """The GPU check's accuracy step, run through the interpreter on its smallest shapes (`--device cpu`):
    both plans, a bf16 case judged at bf16's own rounding, every record within its tolerance."""
    from bype.bench import _gpu_accuracy
    from kernels import mixture as mix
    from tests.helpers import triton_skip_reason

    reason = triton_skip_reason(mix._triton_module)
    if reason:
        pytest.skip(reason)
    out = tmp_path / "acc.json"
    assert _gpu_accuracy.main(["--device", "cpu", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["accuracy"]
    modes = {r["mode"] for r in records if r["op"] == "mixture_logpdf"}
    assert {"shared", "shared/split", "diag+bf16/fused"} <= modes
    bf16 = next(r for r in records if r["mode"] == "diag+bf16/fused")
    assert bf16["tol"] == _gpu_accuracy.BF16_TOL and 0 < max(bf16["errors"].values()) <= bf16["tol"]


def test_speed_steps_and_their_summary(tmp_path):
    """The training-step benchmark runs eager and with train.compile=true (the open question of CUDA graphs at
    batch 100), each parsed from its own folder into per-prior lines of the summary."""
    steps = {s.name: s for s in gpu_check.plan(tmp_path, "/data/fm")}
    assert "train.compile=true" in steps["speed_compiled"].argv
    assert "train.compile=true" not in steps["speed_eager"].argv
    for name, ms in (("speed_eager", 4.0), ("speed_compiled", 21.0)):
        assert {"--device", "cuda", "data.root=/data/fm", str(tmp_path / name)} <= set(steps[name].argv)
        (tmp_path / name).mkdir()
        rows = [dict(row="bype", step_s=ms * 1e-3, matmul_floor_s=1e-3, vs_floor=ms,
                     compiled=name.endswith("compiled"))]
        (tmp_path / name / "speed.json").write_text(json.dumps(dict(rows=rows)))
    results = {n: gpu_check.parse(n, "", tmp_path) for n in ("speed_eager", "speed_compiled")}
    lines = gpu_check.speed_lines(results)
    assert "- eager bype: 4.00 ms per step, matmul floor 1.00 ms (4.00x)" in lines
    assert "- compiled bype: 21.00 ms per step, matmul floor 1.00 ms (21.00x)" in lines
