"""Distributed training on CPU with gloo: torchrun DDP and DeepSpeed ZeRO-1/2 with 2 and 3 ranks for every
mixture prior (sharded prior encodings), two "nodes" on localhost, elastic restarts, a ZeRO-2 resume, and
the coreset kept identical on every rank.

Every test launches real processes (torchrun, the launch/ scripts) on small real Fashion-MNIST subsets
and compares what they wrote against a single-process run in this process.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bype.train import checkpoint
from bype.config import load_config
from bype.train.metrics import read_metrics as metrics
from bype.train.loop import Trainer

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Small but real: 400 images, 8 steps of a global batch of 50 per epoch, a coreset update every epoch
# with the exact data term (sufficient statistics of the whole training set).
SMALL = ["data.train_limit=400", "data.eval_limit=100", "model.hidden=64", "prior.components=20",
         "coreset.every=1", "coreset.steps=3", "coreset.data_term=exact", "eval.at_end=false",
         "eval.knn_k=[3]", "train.batch_size=50", "train.log_every=1000", "train.warmup_epochs=2"]
# float32 summation order differs between 1 and 2 ranks (and with the thread count); measured drift ~1e-5
# after 3 epochs, relative to each tensor's scale (the weights w are N/M = 20, the network's about 1).
RTOL = 1e-4

def dist_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
               TORCHRUN=str(BIN / "torchrun"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # DeepSpeed's JIT ops
    env.update(extra)
    return env


def start(cmd, **env) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=dist_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, expect_ok: bool = True) -> str:
    """Wait for `proc` (killing its whole process group on time-out); fail with its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} timed out after {timeout} s\n{out[-8000:]}")
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(proc.args)} exited {proc.returncode}\n{out[-8000:]}")
    return out


def run(cmd, timeout: float = 120, **env) -> str:
    return finish(start(cmd, **env), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        diff = (got[k].double() - want[k].double()).abs().max().item()
        tol = RTOL * max(1.0, want[k].double().abs().max().item())
        assert diff <= tol, f"{what}: {k} differs by {diff:.3g} (allowed {tol:.3g})"


def one_process(tmp_path, name: str, epochs: list[int], *overrides) -> tuple[list[dict], list[dict]]:
    """The single-process reference: model states after each of `epochs`, and its metrics."""
    cfg = load_config(None, [f"out_dir={tmp_path}", f"name={name}", *SMALL, *overrides])
    trainer = Trainer(cfg)
    states = []
    for e in epochs:
        cfg.train.epochs = e
        trainer.fit()
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    return states, metrics(cfg.run_dir)


# The priors' matrix: tiny runs (240 images, 4 global batches of 60, 20 mixture rows: uneven over 3 ranks).
TINY = ["data.train_limit=240", "data.eval_limit=60", "model.hidden=32", "model.latent_dim=8",
        "prior.components=20", "prior.exemplar.subset=100", "coreset.every=1", "coreset.steps=2",
        "coreset.data_term=exact", "eval.at_end=false", "eval.n_samples_grid=4", "train.batch_size=60",
        "train.log_every=1000", "train.warmup_epochs=2", "train.epochs=2"]
PRIORS = {"bype": ["prior.kind=bype"], "vamp": ["prior.kind=vampprior"], "ex": ["prior.kind=exemplar"],
          "exknn": ["prior.kind=exemplar", "prior.exemplar.knn=5"]}  # kNN: the bank's cache sharded too
ENGINES = {"ddp": ["dist.engine=ddp"], "zero1": ["dist.engine=deepspeed", "dist.zero_stage=1"],
           "zero2": ["dist.engine=deepspeed", "dist.zero_stage=2"]}
FLAGS = {"compiled": ["train.compile=true"]}  # DDP around the compiled loss (bype/train/compiled_loss.py)
# Every prior with DDP and with DeepSpeed at each world size; every (prior, ZeRO stage) pair over the two.
MATRIX = {2: ["bype-ddp", "bype-ddp-compiled", "bype-zero1", "bype-zero2", "vamp-ddp", "vamp-zero2", "ex-ddp", "ex-zero1"],
          3: ["bype-ddp", "bype-zero2", "vamp-ddp", "vamp-zero1", "ex-ddp", "ex-zero2", "exknn-ddp"]}

# One launch trains several cases in a row in the same process group (launches cost most of the time).
MATRIX_DRIVER = """
import json, os, sys, torch
from bype.config import load_config
from bype.parallel.process_group import finish
from bype.train.loop import Trainer
out, cases = sys.argv[1], json.loads(sys.argv[2])
for name, overrides in cases:
    trainer = Trainer(load_config(None, [*sys.argv[3:], f"name={name}", *overrides]))
    assert trainer.model.prior.row_shard.world_size == int(os.environ["WORLD_SIZE"])  # the sharded path runs
    trainer.fit()
    state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    torch.save(state, os.path.join(out, f"{name}.rank{trainer.ctx.rank}.pt"))
finish(0)
"""


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, fmnist_root):
    """The single-process reference of each prior: final model state and metrics."""
    out = tmp_path_factory.mktemp("one")
    refs, fresh = {}, {}
    for short, prior in PRIORS.items():
        trainer = Trainer(load_config(None, [f"out_dir={out}", f"name={short}", *prior, *TINY]))
        fresh[short] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit()
        refs[short] = (trainer.model.state_dict(), metrics(out / short))
    # The comparisons mean something: the coreset and the VampPrior's pseudo-inputs did move.
    assert (refs["bype"][0]["prior.U"] - fresh["bype"]["prior.U"]).abs().max() > 1e-3
    assert (refs["bype"][0]["prior.w"] - fresh["bype"]["prior.w"]).abs().max() > 1e-3
    assert (refs["vamp"][0]["prior.pseudo_raw"] - fresh["vamp"]["prior.pseudo_raw"]).abs().max() > 1e-4
    return refs


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_reproduce_one_process_for_every_prior_and_engine(tmp_path, one_process_runs, world):
    """W ranks, each encoding only its share of the mixture rows, train the one-process model: parameters,
    U, w and the logged losses within 1e-4, the replicas bitwise identical, the coreset hash check (after
    every update, inside the trainer) passing."""
    def overrides(name):
        prior, engine, *flags = name.split("-")
        return [*PRIORS[prior], *ENGINES[engine], *(o for f in flags for o in FLAGS[f])]

    cases = [[name, overrides(name)] for name in MATRIX[world]]
    (tmp_path / "driver.py").write_text(MATRIX_DRIVER)
    run([*TORCHRUN, "--standalone", "--nproc-per-node", str(world), tmp_path / "driver.py", tmp_path,
         json.dumps(cases), f"out_dir={tmp_path}", *TINY], timeout=600)
    for name, _ in cases:
        ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt") for r in range(world)]
        for k in ranks[0]:
            assert all(torch.equal(ranks[0][k], other[k]) for other in ranks[1:]), f"{name}: {k} differs between ranks"
        ref_state, ref_metrics = one_process_runs[name.split("-")[0]]
        assert_close(ranks[0], ref_state, f"{name}, {world} ranks vs 1")
        got = metrics(tmp_path / name)
        assert [r["epoch"] for r in got] == [1, 2]
        # A logged loss averages float32 means over B = 60 rows of float32 sums over D = 784 pixels, terms of one
        # sign, summed in another order by W ranks (and fused when compiled): gamma_n = n 2^-24 each, n = D + B.
        loss_rel = 2 * (784 + 60) * 2.0**-24
        for a, b in zip(got, ref_metrics):
            for key in ("train_loss", "val_loss"):
                assert a[key] == pytest.approx(b[key], rel=loss_rel), f"{name}: {key}"
            if name.startswith("bype"):
                # ½Var(R) of residuals R ~ 5e4 nats (fp32 sums of 784-pixel log-likelihoods, another order per
                # shard): err(R) ~ 1e-6 |R| ~ 0.05, so err(½Var) ~ std(R) err(R) ~ 1 nat of ~130: 1e-2 relative
                key = "coreset_heldout_half_var_after"
                assert a[key] == pytest.approx(b[key], rel=1e-2), f"{name}: {key}"


def test_two_nodes_rendezvous_on_localhost(tmp_path, fmnist_root):
    port = free_port()
    nodes = [start(["bash", "launch/multinode.sh", "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
                    "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1", "--",
                    f"out_dir={tmp_path}", "name=nodes", "train.epochs=2", *SMALL], MAX_RESTARTS="0")
             for rank in (0, 1)]
    outputs = [finish(p, timeout=150) for p in nodes]
    report = json.loads((tmp_path / "nodes" / "report.json").read_text())
    assert report["world_size"] == 2, outputs[0][-3000:]
    assert [r["epoch"] for r in metrics(tmp_path / "nodes")] == [1, 2]


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the workers torchrun's agent started."""
    pids = {}
    with open(f"/proc/{agent_pid}/task/{agent_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except FileNotFoundError:
            continue
        if b"RANK" in env:
            pids[int(env[b"RANK"])] = pid
    return pids


def test_killed_worker_restarts_and_resumes_without_losing_an_epoch(tmp_path, fmnist_root):
    run_dir = tmp_path / "elastic"
    # 4000 images = 80 steps per epoch: long enough (about a second) to kill rank 1 inside epoch 2.
    proc = start(["bash", "launch/torchrun.sh", "2", f"out_dir={tmp_path}", "name=elastic", "train.epochs=3",
                  *SMALL, "data.train_limit=4000"], MAX_RESTARTS="1")
    deadline = time.time() + 120
    while not (run_dir / "last.pt").exists():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail("no checkpoint appeared\n" + finish(proc, 10, expect_ok=False)[-8000:])
        time.sleep(0.05)
    time.sleep(0.3)
    victim = _worker_pids(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)
    out = finish(proc, timeout=150)

    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3], out[-4000:]
    assert [r["step"] for r in records] == [80, 160, 240]  # no step counted twice
    assert "resumed" in out and "at epoch 1" in out, out[-4000:]  # the restarted workers took last.pt
    assert checkpoint.load(str(run_dir / "last.pt"))["epoch"] == 3


def test_deepspeed_zero2_trains_checkpoints_and_resumes(tmp_path, fmnist_root):
    args = [f"out_dir={tmp_path}", "name=ds", "dist.engine=deepspeed",
            "dist.deepspeed_config=configs/deepspeed/zero2.yaml", *SMALL]
    run(["bash", "launch/torchrun.sh", "2", *args, "train.epochs=2"], timeout=400)
    run_dir = tmp_path / "ds"
    after2 = checkpoint.load(str(run_dir / "last.pt"))
    assert after2["engine"]["deepspeed_tag"] == "epoch000002" and after2["engine"]["zero_stage"] == 2
    assert sorted(os.listdir(run_dir / "deepspeed" / "epoch000002")) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    out = run(["bash", "launch/torchrun.sh", "2", "--resume", run_dir, "train.epochs=3"], timeout=400)
    after3 = checkpoint.load(str(run_dir / "last.pt"))
    assert "resumed" in out and after3["epoch"] == 3
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2, 3]

    # ZeRO-2 with 2 ranks, resumed from its own sharded optimiser state, follows the 1-process run.
    # (A resume that lost the fp32 master weights or Adam moments is off by ~1e-1.)
    (ref2, ref3), _ = one_process(tmp_path, "single", [2, 3])
    assert_close(after2["model"], ref2, "ZeRO-2 after 2 epochs")
    assert_close(after3["model"], ref3, "ZeRO-2 resumed, after 3 epochs")


MISMATCH = """
import sys, torch, torch.distributed as dist
from bype import coreset
from bype.cli import main
from bype.parallel.process_group import ReplicaMismatchError, check_replicated

dist.init_process_group("gloo")
rank = dist.get_rank()
U, w = torch.linspace(0, 1, 12).reshape(3, 4), torch.full((3,), 2.0)
check_replicated({"U": U, "w": w, "log_var": torch.tensor(0.5)}, "identical")  # passes on every rank
if rank == 1:
    U[2, 3] = torch.nextafter(U[2, 3], torch.tensor(2.0))  # one ulp
try:
    check_replicated({"U": U, "w": w, "log_var": torch.tensor(0.5)}, "unit")
    print(f"rank {rank}: no error")
except ReplicaMismatchError as e:
    print(f"rank {rank} caught: {e}")

# In the trainer: rank 1's coreset update drifts by one ulp.
update = coreset.PseudocoresetOptimizer.update
def drifting_update(self, epoch):
    out = update(self, epoch)
    if rank == 1:
        self.prior.w[0] = torch.nextafter(self.prior.w[0], torch.tensor(float("inf")))
    return out
coreset.PseudocoresetOptimizer.update = drifting_update
main(["train", *sys.argv[1:]])
"""


def test_coreset_hash_mismatch_is_detected(tmp_path, fmnist_root):
    (tmp_path / "mismatch.py").write_text(MISMATCH)
    proc = start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", tmp_path / "mismatch.py",
                  f"out_dir={tmp_path}", "name=mm", "dist.engine=ddp", "train.epochs=2", *SMALL])
    out = finish(proc, timeout=120, expect_ok=False)
    assert proc.returncode != 0, out[-4000:]
    for rank in (0, 1):  # every rank sees the verdict, so none is left waiting in a collective
        assert f"rank {rank} caught: unit: U on rank(s) 1 differ from rank 0" in out, out[-4000:]
    assert "bype: error: coreset after the update of epoch 1: w on rank(s) 1 differ from rank 0" in out, out[-4000:]
    assert [r["epoch"] for r in metrics(tmp_path / "mm")] == []  # stopped before logging the diverged epoch
