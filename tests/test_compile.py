"""A fast training step: the compiled loss (no graph breaks, the same numbers as eager), bf16 autocast,
statistics read only at log lines, and the count of host synchronisations between them."""
import logging

import pytest
import torch
import torch._dynamo

import kernels
from bype.train.compiled_loss import CompiledLoss, NoiseTape, plan_compile
from bype.config import load_config
from bype.train.engines import LocalEngine
from bype.parallel.process_group import DistContext
from bype.models import build_model
from bype.models.noise import RowNoise
from bype.train.step_stats import EpochStats, HostSyncCounter, RunningSums
from bype.train.loop import Trainer
from tests.helpers import tiny_config

SMALL = ["model.hidden=32", "model.latent_dim=6", "prior.components=12"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _model(arch, prior, shape=(1, 28, 28), device="cpu"):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.arch={arch}", f"prior.kind={prior}", *SMALL])
    model = build_model(cfg, shape)
    if model.prior.n_components:
        model.prior.init_from_data(torch.rand(model.prior.n_components, 784), 1000)
    return model.to(device)


@pytest.fixture(autouse=True)
def _kernels_runnable_on_cuda(monkeypatch):
    """The suite sets TRITON_INTERPRET=1 for CPU tensors; the interpreter cannot run CUDA tensors, so CUDA
    tests here take the prior's torch path (the Triton kernels have their own CUDA tests)."""
    if torch.cuda.is_available() and kernels.interpreter_enabled():
        monkeypatch.setenv(kernels.ENV_VAR, "torch")


def _batch(n=16, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 784, generator=g) < 0.3).float().to(device), torch.arange(n, device=device)


@pytest.mark.parametrize("arch,prior", [("vae", "bype"), ("vae", "gaussian"), ("vae", "vampprior"),
                                        ("hvae", "bype"), ("convhvae", "bype")])
def test_loss_traces_as_one_graph(arch, prior):
    model = _model(arch, prior)
    x, idx = _batch()
    n_draws = 1 if arch == "vae" else 2  # hierarchical models draw z2 and z1
    tape = NoiseTape()
    tape.draws = [RowNoise(0, 1, 0).randn_like(torch.empty(len(x), 6)) for _ in range(n_draws)]
    explained = torch._dynamo.explain(model)(x, idx, torch.tensor(0.5), tape)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    if prior == "bype":  # the mixture prior is the kernels' custom op: one node, traced through
        nodes = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
        assert any("bype_kernels.mixture_logpdf" in t for t in nodes)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_loss_matches_eager_with_the_same_noise(device):
    torch._dynamo.reset()
    eager, compiled = _model("vae", "bype", device=device), _model("vae", "bype", device=device)
    fn = CompiledLoss(compiled, "reduce-overhead" if device == "cuda" else "default")  # CUDA graphs
    x, idx = _batch(device=device)
    for step in range(3):  # step 0 records the draws eagerly, steps 1-2 replay them into the graph
        losses, grads = [], []
        for model, call in ((eager, eager), (compiled, fn)):
            loss, stats = call(x, idx, 0.5, RowNoise(0, 1, step))
            model.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        # fp32 loss of ~500 nats summed over 784 pixels: kernel fusion reorders sums, ~1e-6 relative
        assert torch.allclose(losses[0], losses[1], rtol=1e-5), (step, losses)
        for k, g in grads[0].items():
            assert torch.allclose(g, grads[1][k], rtol=1e-4, atol=1e-4 * g.abs().max().item()), (step, k)
    assert len(fn.specs) == 1 and [s[0] for s in next(iter(fn.specs.values()))] == ["randn_like"]


def test_plan_compile_decides_by_device_run_length_and_prior():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def plan(*overrides, device=cpu):
        return plan_compile(load_config(None, list(overrides)), device)[0]

    assert plan("train.max_minutes=5.5") is None  # the short default run: compiling does not pay
    assert plan("train.max_minutes=null") == "default"
    assert plan("train.max_minutes=null", device=cuda) is None  # measured slower on a GPU
    assert plan("train.compile=true", device=cuda) == "reduce-overhead"  # CUDA graphs when asked
    assert plan("train.max_minutes=null", "prior.kind=exemplar") is None
    assert plan("train.compile=true", "train.max_minutes=1") == "default"
    assert plan("train.compile=false", device=cuda) is None
    assert plan("train.compile=true", "train.compile_mode=max-autotune") == "max-autotune"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_heads_and_prior_in_fp32(tmp_path, device):
    cfg = tiny_config(tmp_path, "dist.precision=bf16", f"device={device}")
    model = _model("vae", "bype", device=device)
    engine = LocalEngine(cfg, model, DistContext(device=torch.device(device)))
    x, idx = _batch(device=device)
    seen = {}
    log_prob = model.prior.log_prob
    model.prior.log_prob = lambda z, m, i=None: seen.setdefault("log_p", log_prob(z, m, i))
    loss_bf16, _ = engine(x, idx, 1.0, RowNoise(0, 1, 0))
    loss_fp32, _ = model(x, idx, 1.0, RowNoise(0, 1, 0))
    assert seen["log_p"].dtype == torch.float32 and loss_bf16.dtype == torch.float32
    # bf16 matmuls carry 8 bits of mantissa: the ~500-nat loss moves by well under 1%
    assert abs(loss_bf16.item() - loss_fp32.item()) < 1e-2 * abs(loss_fp32.item())
    assert loss_bf16.item() != loss_fp32.item()  # autocast really ran the matmuls in bf16
    engine.backward(loss_bf16)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_dist_precision_fp16_still_needs_deepspeed():
    from bype.config import ConfigError

    with pytest.raises(ConfigError, match="dist.precision: fp16 needs dist.engine=deepspeed"):
        load_config(None, ["dist.precision=fp16"])


def test_running_sums_raise_at_the_read_naming_the_first_bad_step():
    sums = RunningSums(("loss", "kl"), torch.device("cpu"))
    sums.add(torch.tensor(2.0), {"kl": torch.tensor(1.0)}, step=0)
    sums.add(torch.tensor(float("nan")), {"kl": torch.tensor(1.0)}, step=1)
    sums.add(torch.tensor(float("inf")), {"kl": torch.tensor(1.0)}, step=2)
    with pytest.raises(FloatingPointError, match="epoch 3 step 1: loss is nan"):
        sums.read("epoch 3 ")
    ok = RunningSums(("loss", "kl"), torch.device("cpu"))
    for i in range(4):
        ok.add(torch.tensor(float(i)), {"kl": torch.tensor(0.5)}, step=i)
    assert ok.read() == ({"loss": 6.0, "kl": 2.0}, 4)
    assert ok.read() == ({"loss": 0.0, "kl": 0.0}, 0)


def test_host_sync_counter_counts_values_read_by_python_only():
    counter = HostSyncCounter(torch.device("cpu"))
    x = torch.randn(8)
    counter.start()
    x.sum().item()
    bool(x[0] > 0)
    float(x[1])
    torch.stack([x, x]).sum(0)  # device work only
    assert counter.stop() == 3


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("device,compile", [("cpu", "false"), *[pytest.param("cuda", c, marks=DEVICES[1].marks)
                                                                  for c in ("false", "true")]])
def test_training_epoch_reads_the_host_only_at_log_lines(tmp_path, fmnist_root, device, compile):
    cfg = tiny_config(tmp_path, "prior.kind=bype", "train.log_every=10", "train.sync_debug=true", f"device={device}",
                      "train.max_minutes=null", f"train.compile={compile}", "name=sync")
    trainer = Trainer(cfg)
    lines = _Lines()
    logging.getLogger("bype").addHandler(lines)  # after the Trainer's logging set-up
    try:
        record = trainer.train_epoch(1)
    finally:
        logging.getLogger("bype").removeHandler(lines)
    counts = [m for m in lines.lines if "host syncs between log lines" in m]
    assert len(counts) == record["steps"] // 10 == 2
    first = 1 if compile == "true" else 0  # the first window holds the eager step and the compilation
    assert all(c.startswith("host syncs between log lines: 0 in 10 steps") for c in counts[first:]), counts
    assert record["train_loss"] > 0


def test_epoch_stats_give_the_same_sums_as_reading_every_step():
    stats = EpochStats(("loss", "rec"), torch.device("cpu"), log_every=3, steps=7)
    postfix = []
    for i in range(7):
        postfix.append(stats.add(torch.tensor(float(i)), {"rec": torch.tensor(2.0 * i)}, i))
    assert [bool(p) for p in postfix] == [False, False, True, False, False, True, True]
    assert postfix[2]["loss"] == 1.0 and postfix[6]["loss"] == 6.0  # means since the previous log line
    assert stats.close() == {"loss": 21.0, "rec": 42.0}


def test_bench_speed_counts_a_compiled_step_like_an_eager_one(tmp_path, fmnist_root):
    """`bype bench speed` counts FLOPs under FlopCounterMode, which cannot see into a compiled graph (it
    failed every row with train.compile on): the count runs the step's eager operators."""
    from bype.bench.speed import count_step_flops

    counts = {}
    for compile in ("false", "true"):
        cfg = tiny_config(tmp_path, "prior.kind=bype", f"train.compile={compile}", f"name=flops-{compile}", *SMALL)
        trainer = Trainer(cfg)
        count_step_flops(trainer)  # the first step of a shape runs eagerly (it records the noise draws)
        counts[compile] = count_step_flops(trainer)  # the second one goes through the compiled loss
    assert counts["true"] == counts["false"] > 0
