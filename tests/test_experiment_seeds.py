"""Grids with seeds: one run per seed, grouped into one row with mean and spread; parallel jobs."""
import statistics

import pytest

from bype.experiment.grid import RunSpec, load_grid
from bype.experiment.report import RunResult
from bype.experiment.tables import coreset_table, mean_spread, seed_table

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
    # Seed-major: an interrupted grid holds whole seeds, every row of them comparable pairwise.
    assert [r.name for r in grid.runs] == ["a-s3", "b-s3", "a-s7", "b-s7"]
    assert [r.group for r in grid.runs] == ["a", "b", "a", "b"]
    # The seed after the shared overrides, before the run's own and the command line's.
    assert grid.runs[2].overrides == ["train.epochs=2", "seed=7", "prior.kind=gaussian", "eval.at_end=false"]
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
    assert "| b-s0 | 2 (1) | posterior | ½Var(R) 10 -> 2 (ESS 1.5) | - | 0.5 .. 3 | 3.2 of 4 | 0.0150 |" in table
    # The exemplar objective's updates show its cross-entropy gap, and the weighted-mean gap when logged.
    ex = [{"epoch": e, "coreset_heldout_ce_gap_before": 2.0 / e, "coreset_heldout_ce_gap_after": 1.0 / e,
           "coreset_heldout_ce_after": 60.0, "coreset_mean_gap_before": 0.5, "coreset_mean_gap_after": 0.25,
           "coreset_w_min": 0.5, "coreset_w_max": 3.0, "coreset_w_ess": 3.2, "coreset_u_mean_abs_change": 0.02,
           "coreset_rolled_back": 0.0} for e in (1, 2)]
    table = coreset_table([_result("c-s0", "c", 90.0, ex)])
    assert ("| c-s0 | 2 (0) | exemplar | cross-entropy gap to p_E 2 -> 0.5 nats | 0.5 -> 0.25 | 0.5 .. 3 "
            "| 3.2 of 4 | 0.0200 |") in table


def test_paired_differences_and_cost_ratio():
    from bype.experiment.tables import cost_ratio, paired_table

    def run(name, group, seed, nll, prior="bype", seconds=10.0):
        r = _result(name, group, nll)
        r.config["seed"] = seed
        r.report.update(prior=prior, epochs=10, train_seconds=seconds)
        return r

    runs = [run("a-s0", "a", 0, 100.0), run("b-s0", "b", 0, 101.0, "exemplar", 30.0),
            run("a-s1", "a", 1, 102.0), run("b-s1", "b", 1, 102.5, "exemplar", 30.0)]
    table = paired_table(runs)
    assert f"| b | 0.75 ± {statistics.stdev([1.0, 0.5]):.2f} (2) | s0: +1.00, s1: +0.50 | 2 of 2 |" in table
    assert "b / a: 3.00 / 1.00 s per epoch = **3.00x**" in cost_ratio(runs)
