"""The cost model's inputs (FLOPs counted on a real model) and its formula."""
import math

import pytest

from bype.config import load_config
from bype.bench.perf.cost_model import Device, allreduce_seconds, efficiency, predict
from bype.bench.perf.flops import OPTIMIZER_BYTES_PER_PARAM, model_profile

DEV = Device("test", flops=1e12, tau=1e-6, mem_bw=1e11, link_in=1e10, link_out=1e9, per_node=4, alpha=0.0)
PROFILE = {"flops_batch": 4e9, "flops_prior": 6e9, "ops": 300, "allreduce_bytes": 4e6,
           "optimizer_bytes": 36e6, "gather_bytes": 8e4}


def test_encoder_flops_per_row_match_the_layer_shapes():
    cfg = load_config(None, ["model.hidden=30", "model.latent_dim=4", "prior.components=10"])
    prof = model_profile(cfg, (1, 28, 28), batch=20, probe_rows=2)
    d, h, lat = 784, 30, 4
    # Forward: two gated layers (two linears each) and two heads; 2 FLOPs per multiply-add.
    fwd = 2 * (2 * d * h + 2 * h * h + 2 * h * lat)
    # Backward: weight gradients of every layer, input gradients of all but the first (the rows need none).
    assert prof["encoder_flops_per_row"] == 2 * fwd + (fwd - 4 * d * h)
    assert prof["flops_prior"] == 10 * prof["encoder_flops_per_row"]
    assert prof["flops_batch"] > 2 * 20 * prof["encoder_flops_per_row"] / 2  # encoder + decoder of 20 rows
    assert prof["optimizer_bytes"] == OPTIMIZER_BYTES_PER_PARAM * prof["params"]
    assert prof["allreduce_bytes"] == 4 * prof["params"] and prof["ops"] > 50


def test_one_rank_has_no_communication():
    p = predict(PROFILE, DEV, 1)
    assert p["t_comm"] == 0.0
    assert p["t_step"] == pytest.approx(10e9 / 1e12 + 300e-6 + 36e6 / 1e11)


def test_sharding_divides_the_prior_part_and_adds_the_gather():
    for w in (2, 3, 8):
        sharded, replicated = predict(PROFILE, DEV, w, True), predict(PROFILE, DEV, w, False)
        assert sharded["t_compute"] == pytest.approx((4e9 + 6e9) / w / 1e12)
        assert replicated["t_compute"] == pytest.approx((4e9 / w + 6e9) / 1e12)
        assert sharded["t_comm"] - replicated["t_comm"] == pytest.approx(1.5 * allreduce_seconds(8e4, w, DEV))


def test_allreduce_is_a_ring_inside_a_node_and_adds_the_node_link_across_nodes():
    assert allreduce_seconds(1e6, 4, DEV) == pytest.approx(2 * 3 / 4 * 1e6 / 1e10)
    assert allreduce_seconds(1e6, 8, DEV) == pytest.approx(2 * 3 / 4 * 1e6 / 1e10 + 2 * 1 / 2 * 1e6 / 1e9)
    assert allreduce_seconds(1e6, 1, DEV) == 0.0


def test_efficiency_definitions():
    assert efficiency(PROFILE, DEV, 1) == pytest.approx(1.0)
    t1, t4 = predict(PROFILE, DEV, 1)["t_step"], predict(PROFILE, DEV, 4)["t_step"]
    assert efficiency(PROFILE, DEV, 4) == pytest.approx(t1 / (4 * t4))
    # Weak scaling: 4x the rows in 4 ranks; with the prior sharded each rank encodes a quarter of it.
    weak = predict(PROFILE, DEV, 4, weak=True)
    assert weak["t_compute"] == pytest.approx((4e9 + 6e9 / 4) / 1e12)
    assert math.isclose(efficiency(PROFILE, DEV, 4, weak=True), t1 / weak["t_step"])


def test_a_compiled_step_is_counted_like_the_eager_one():
    """FlopCounterMode cannot trace into a compiled graph (it failed `bype bench scaling` under the default
    train.compile): the count runs the step's eager operators."""
    import torch

    from bype.train.compiled_loss import CompiledLoss
    from bype.models import build_model
    from bype.bench.perf.flops import count_step

    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.hidden=30", "model.latent_dim=4", "prior.components=10"]),
                        (1, 28, 28))
    model.prior.init_from_data(torch.rand(10, 784), 100)
    x, idx = torch.rand(6, 784), torch.arange(6)
    eager = count_step(model, model, x, idx)
    compiled = count_step(CompiledLoss(model, "default"), model, x, idx)
    assert eager["flops"] > 0 and compiled == eager
