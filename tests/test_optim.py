"""The normalised-gradient Adam: the same numbers as the per-tensor loop it replaces, without host reads."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bype.train.optim import Adam, NormalizedAdam, adam_implementation

LR = 5e-4
STEPS = 200
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


class ReferenceNormalizedAdam(torch.optim.Adam):
    """The optimiser as first written: a Python loop, a host-side test of each norm, single-tensor Adam."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    norm = p.grad.norm()
                    if norm > 0:
                        p.grad.div_(norm)
        return super().step(closure)


class HostReads(TorchDispatchMode):
    """Counts values copied to the host (`.item()`, `bool(t)`, `float(t)` all end in _local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    net.frozen = nn.Parameter(torch.randn(5))  # in the graph with a zero gradient: the `norm > 0` case
    return net.to(device)


def _loss(net, step):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(32, 12, generator=g), torch.randn(32, 3, generator=g)
    dev = net.frozen.device
    return ((net(x.to(dev)) - y.to(dev)) ** 2).mean() + 0.0 * net.frozen.sum()


def _train(net, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        _loss(net, i).backward()
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_implementation_chosen_on_cpu_and_cuda(device):
    assert adam_implementation(list(_model(device=device).parameters())) == {"fused": True}


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_per_tensor_loop_over_many_steps(device):
    ref, new = _model(device=device), _model(device=device)
    _train(ref, ReferenceNormalizedAdam(ref.parameters(), lr=LR), STEPS)
    _train(new, NormalizedAdam(new.parameters(), lr=LR, **adam_implementation(list(new.parameters()))), STEPS)
    moved = max((a - b).abs().max().item() for a, b in zip(_model(device=device).parameters(), ref.parameters()))
    assert moved > 50 * LR  # the run really moves the weights (Adam steps are about LR each)
    # fp32 rounding of a norm / fused update is ~1e-7 relative, i.e. ~LR * 1e-6 per step; allow 100x that,
    # summed over every step: still 1000x smaller than one step, which any real difference would show.
    tol = STEPS * LR * 1e-4
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=tol), (name, (a - b).abs().max().item())
    assert torch.equal(new.frozen, _model(device=device).frozen)  # a zero gradient leaves it untouched, no NaN


def test_resumes_a_checkpoint_of_the_loop_implementation():
    ref, new = _model(), _model()
    ref_opt = ReferenceNormalizedAdam(ref.parameters(), lr=LR)
    _train(ref, ref_opt, 20)
    new.load_state_dict(ref.state_dict())
    new_opt = NormalizedAdam(new.parameters(), lr=LR, fused=True)
    new_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as from a checkpoint: no shared moments
    assert new_opt.param_groups[0]["fused"] is True  # the saved single-tensor flags are not restored
    _train(ref, ref_opt, 20, start=20)
    _train(new, new_opt, 20, start=20)
    for a, b in zip(ref.parameters(), new.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=40 * LR * 1e-4)  # same per-step bound as above


@pytest.mark.parametrize("cls", [NormalizedAdam, Adam])
@pytest.mark.parametrize("device", DEVICES)
def test_step_reads_nothing_back_to_the_host(cls, device):
    net = _model(device=device)
    opt = cls(net.parameters(), lr=LR, **adam_implementation(list(net.parameters())))
    _train(net, opt, 1)  # the first step creates the state
    _loss(net, 1).backward()
    with HostReads() as reads:
        opt.step()
    assert reads.count == 0
    if device == "cuda":  # and nothing else synchronises either
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with HostReads() as reads:
        ReferenceNormalizedAdam(net.parameters(), lr=LR).step()
    assert reads.count >= 4  # the counter sees the loop's `if norm > 0` (one read per tensor)
