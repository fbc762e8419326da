"""The coreset update sharded over ranks: torchrun W = 2 and W = 3 (gloo, CPU) against one process.

Every rank draws the same samples, evaluates its S / W share and all-reduces the sums (bype/coreset/estimate.py).
The worker runs `fit` on the linear-Gaussian model and two updates of the VAE's pseudocoreset optimiser
(exact and minibatch data terms), checks after each update that U and w are bitwise the same on every
rank (the trainer's hash check) and saves rank 0's results.

Everything runs in float64. The residual R = data term - w @ A cancels two terms of T ~ 3e5 nats to a spread
of ~20, so float32 rounding of those terms (T 2^-24 ~ 0.02 nats, in another order on every rank count and
vector path) is ~1e-3 of the gradients, which Adam's normalised steps turn into parameter differences of
lr x 1e-3, and the held-out ½Var(R) of 17 samples magnifies those again: in float32 the comparison measured
the summation order, not the sharding. In float64 every tolerance below follows from T, the number of
summed terms and eps, and is still ~1e-9 relative. (The float32 sharded update runs in tests/test_coreset.py's
DDP test and tests/test_distributed.py.)
"""
import contextlib
import math
import subprocess

import pytest
import torch

from test_coreset import make_optimizer
from test_coreset_fit import PROBLEMS, LinearGaussian
from test_distributed import TORCHRUN, dist_env, ROOT

pytestmark = pytest.mark.dist

MODES = ("exact", "minibatch")
UPDATES = (1, 2)  # the VAE's updates (epochs), here and in the worker
EPS = torch.finfo(torch.float64).eps

WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, "tests")
from pathlib import Path
from bype.coreset import FitOptions, fit
from bype.parallel.process_group import check_replicated, finish
from test_coreset import make_optimizer
from test_coreset_fit import PROBLEMS, LinearGaussian
out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)  # the VAE, U and w in float64, as in _single_process
lg = LinearGaussian(**PROBLEMS["small"])
U, w = lg.init(10)
res = fit(lg.loglik, U, w, lg.sample_z, lg.data_term, n_data=lg.n, options=FitOptions(steps=30, samples=61))
check_replicated({"U": U, "w": w}, "linear-Gaussian fit")
saved = {"lg": (U, w, res["heldout_half_var_after"])}
for mode in ("exact", "minibatch"):
    opt, model = make_optimizer(out / "data", f"coreset.data_term={mode}", "coreset.samples=17")
    for epoch in (1, 2):
        res = opt.update(epoch)
        check_replicated({"U": model.prior.U, "w": model.prior.w}, f"{mode} update {epoch}")
    saved[mode] = (model.prior.U.clone(), model.prior.w.clone(), res["heldout_half_var_after"])
if rank == 0:
    torch.save(saved, out / f"world{world}.pt")
finish(0)
"""


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Case:
    """One process's result for one problem, how to re-evaluate its held-out ½Var(R) at any (U, w), and the
    scales its tolerances come from."""

    def __init__(self, U, w, obj, held_out, *, T, n_terms, min_half_var, samples, total_lr_w, total_lr_u):
        self.U, self.w, self.obj, self.held_out = U, w, obj, held_out
        # One float64 evaluation of R: its terms, of size T, are sums of at most n_terms values (gamma_n bound).
        self.err_R = n_terms * EPS * T
        self.sd_R = math.sqrt(2 * min_half_var)  # the residual's smallest spread over the run's steps
        self.samples, self.total_lr_w, self.total_lr_u = samples, total_lr_w, total_lr_u

    def half_var_shift(self, d: float) -> float:
        """The most ½Var of S samples moves when every R_s moves by at most d: |Cov(R, δ)| + ½Var(δ)."""
        sd_delta = d * math.sqrt(self.samples / (self.samples - 1))
        return self.sd_R * sd_delta + 0.5 * sd_delta**2


def total_steps(options, U0, updates: int) -> tuple[float, float]:
    """(sum of the steps on log w, on U) over `updates` updates: the scaled schedule's cosine decay sums to
    (steps + 1) / 2 of the first step; the trust factor is at most 1."""
    assert options.schedule == "scaled"
    return tuple(lr * (options.steps + 1) / 2 * updates for lr in options.step_sizes(U0))


def _single_process(tmp_path) -> dict:
    from bype.coreset import FitOptions, fit

    cases = {}
    lg = LinearGaussian(**PROBLEMS["small"])
    U, w = lg.init(10)
    options = FitOptions(steps=30, samples=61)
    lrs = total_steps(options, U, 1)
    res = fit(lg.loglik, U, w, lg.sample_z, lg.data_term, n_data=lg.n, options=options)

    def lg_held_out(U_, w_):  # fit's own held-out evaluation (the same draws), no steps
        return fit(lg.loglik, U_.clone(), w_.clone(), lg.sample_z, lg.data_term, n_data=lg.n,
                   options=FitOptions(steps=0, samples=61))["heldout_half_var_after"]

    z = lg.sample_z(U, w, options.samples, torch.Generator().manual_seed(0))
    T = max(float(lg.data_term(z).abs().max()), float((w @ lg.loglik(U, z)).abs().max()))
    cases["lg"] = Case(U, w, res["heldout_half_var_after"], lg_held_out, T=T, n_terms=lg.d + len(w),
                       min_half_var=min(res["trace"]), samples=options.samples, total_lr_w=lrs[0],
                       total_lr_u=lrs[1])

    with default_dtype(torch.float64):
        for mode in MODES:
            opt, model = make_optimizer(tmp_path / "data", f"coreset.data_term={mode}", "coreset.samples=17")
            options = FitOptions(steps=opt.steps, samples=opt.samples, lr_w=opt.lr, lr_u=opt.lr_u,
                                 domain=model.likelihood.domain)
            lrs = total_steps(options, model.prior.U, len(UPDATES))
            traces = []
            for epoch in UPDATES:
                res = opt.update(epoch)
                traces += opt.trace
            assert not res["rolled_back"], mode  # else its held-out ½Var is of the (U, w) it undid
            U, w = model.prior.U.clone(), model.prior.w.clone()

            def vae_held_out(U_, w_, opt=opt, model=model):  # the optimiser's held-out draws at its last update
                model.eval()
                with torch.no_grad(), default_dtype(torch.float64):  # the minibatch term draws in the default dtype
                    return fit(None, U_.clone(), w_.clone(), opt.sample_z, None, n_data=opt.n_data,
                               options=FitOptions(steps=0, samples=opt.samples, seed=opt.seed, epoch=UPDATES[-1]),
                               pieces=opt.pieces)["heldout_half_var_after"]

            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                p = opt.pieces(U, opt.sample_z(U, w, opt.samples, g), 0, opt.samples, g, False)
            T = max(float(p.data.abs().max()), float((w @ p.A).abs().max()))
            # R's terms: sums over the D pixels, the M components and (minibatch) the B rows
            n_terms = model.data_dim + len(w) + getattr(opt.data_term, "batch_size", 0)
            cases[mode] = Case(U, w, res["heldout_half_var_after"], vae_held_out, T=T, n_terms=n_terms,
                               min_half_var=min(traces), samples=opt.samples, total_lr_w=lrs[0],
                               total_lr_u=lrs[1])
    return cases


@pytest.mark.parametrize("world", [2, 3])  # 17 and 61 samples split unevenly over 2 and 3 ranks
def test_sharded_update_matches_one_process(tmp_path, world):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [*TORCHRUN, "--standalone", f"--nproc-per-node={world}", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = torch.load(tmp_path / f"world{world}.pt")
    ref = _single_process(tmp_path)
    for key in ("lg", *MODES):
        (U, w, obj), one = got[key], ref[key]
        # Two evaluations of R (W ranks, one process) each within err_R: a gradient's relative error is at
        # most that over R's spread, and to first order an Adam step lr m/sqrt(v) moves by at most 2 lr times it.
        rel_grad = 2 * one.err_R / one.sd_R
        tol_U, tol_w = 2 * rel_grad * one.total_lr_u, 2 * rel_grad * one.total_lr_w  # w is stepped as log w
        print(f"\nW={world} {key}: max |ΔU| {float((U - one.U).abs().max()):.2e} (tolerance {tol_U:.1e}), "
              f"max |Δw|/w {float(((w - one.w).abs() / one.w.clamp_min(1e-12)).max()):.2e} (tolerance {tol_w:.1e})")
        torch.testing.assert_close(U, one.U, atol=tol_U, rtol=0)
        torch.testing.assert_close(w, one.w, atol=0, rtol=tol_w)
        # ½Var(R) is ill-conditioned in (U, w): compare it where the parameters are the same, the W-rank
        # run's, re-evaluated in one process; only the two evaluations' rounding of R (2 err_R) differs.
        tol_obj = one.half_var_shift(2 * one.err_R)
        same = one.held_out(U, w)
        print(f"  ½Var(R) {obj:.6g}, minus one process's at its (U, w) {obj - same:+.1e} (tolerance {tol_obj:.1e})")
        assert one.held_out(one.U, one.w) == pytest.approx(one.obj, rel=0, abs=tol_obj), key  # it is fit's evaluation
        assert obj == pytest.approx(same, rel=0, abs=tol_obj), key
