"""Grids with seeds: one run per seed, grouped into one row with mean and spread; parallel jobs."""
import statistics

import pytest

from bype.experiment import RunResult, RunSpec, load_grid
from bype.experiment_coreset import coreset_table, mean_spread, seed_table

GRID = """
title: seeds
out_dir: {out}
seeds: [3, 7]
overrides: [train.epochs=2]
notes: |
  The update helps.
runs:
  - name: a
    overrides: [prior.kind=gaussian]
  - name: b
"""


def test_seeds_expand_into_named_runs_with_their_seed(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(out=tmp_path / "runs"))
    grid = load_grid(str(path), None, ["eval.at_end=false"])
    assert [r.name for r in grid.runs] == ["a-s3", "a-s7", "b-s3", "b-s7"]
    assert [r.group for r in grid.runs] == ["a", "a", "b", "b"]
    # The seed after the shared overrides, before the run's own and the command line's.
    assert grid.runs[1].overrides == ["train.epochs=2", "seed=7", "prior.kind=gaussian", "eval.at_end=false"]
    assert grid.notes == "The update helps."


@pytest.mark.parametrize("bad", ["seeds: 3", "seeds: []", "seeds: [1, x]"])
def test_bad_seeds_are_named(tmp_path, bad):
    path = tmp_path / "grid.yaml"
    path.write_text(f"{bad}\nruns: [{{name: a}}]\n")
    with pytest.raises(ValueError, match="seeds: expected a non-empty list of integers"):
        load_grid(str(path), None, [])


def _result(name, group, nll, updates=()):
    metrics = [{"epoch": 1, "val_loss": nll + 5}, *updates]
    return RunResult(RunSpec(name, None, [], "runs", group), "finished", config={"prior": {"components": 4}},
                     report={"prior": "bype"}, metrics=metrics, evaluation={"test_nll": nll, "knn_5": 0.5})


def test_seed_table_gives_mean_and_sample_sd():
    table = seed_table([_result("a-s0", "a", 100.0), _result("a-s1", "a", 104.0), _result("b-s0", "b", 90.0)])
    sd = statistics.stdev([100.0, 104.0])  # 2.83
    assert f"| a | bype | 2 of 2 | 102.00 ± {sd:.2f} (2) | a-s0: 100.00, a-s1: 104.00 |" in table
    assert "| b | bype | 1 of 1 | 90.00 (1) |" in table
    assert mean_spread([]) == "-"


def test_coreset_table_reads_the_last_update():
    ups = [{"epoch": e, "coreset_heldout_half_var_before": 10.0 * e, "coreset_heldout_half_var_after": float(e),
            "coreset_heldout_ess_after": 1.5, "coreset_w_min": 0.5, "coreset_w_max": 3.0, "coreset_w_ess": 3.2,
            "coreset_u_mean_abs_change": 0.01 * e, "coreset_rolled_back": float(e == 2)} for e in (1, 2)]
    table = coreset_table([_result("b-s0", "b", 90.0, ups)])
    assert "| b-s0 | 2 (1) | 10 -> 2 | 1.5 of 4 | 0.5 .. 3 | 3.2 of 4 | 0.0150 |" in table
