"""A cost model of one data-parallel training step: measured work in, predicted step time out.

Inputs measured on the model (bype.bench.perf.flops, FlopCounterMode and an operator count, one process):

    F_b   FLOPs of the batch part of a step at global batch B (forward + backward)
    F_p   FLOPs of the prior part: the M mixture rows through the encoder, forward + backward
    N_op  operators dispatched per step (each at least one kernel launch on a GPU)
    S_g   bytes of the gradient all-reduce (fp32 parameters)
    S_o   bytes the optimiser reads and writes per step (9 x 4 bytes per parameter)
    S_x   bytes of the gathered prior encodings (M x d fp32; x2 for VampPrior's variances)

and a device's figures: P (peak FLOP/s) x eta (achieved fraction), tau (seconds per operator),
BW_mem, and the links: BW_in inside a node of g ranks, BW_out per node between nodes, latency alpha.

For W ranks (n = ceil(W / g) nodes, g' = min(W, g) ranks per node), per step:

    t_compute = (F_b / W + F_p / W_p) / (eta P)           W_p = W sharded prior, 1 replicated (today's)
    t_launch  = N_op tau
    t_opt     = S_o / BW_mem                               replicated optimiser (DDP)
    AR(S)     = 2 (g'-1)/g' S / BW_in + 2 (n-1)/n S / BW_out + 2 (g'-1 + n-1) alpha   (hierarchical ring)
    t_comm    = AR(S_g) + [sharded] 1.5 AR(S_x)            all-gather forward + all-reduce backward
    t_step    = t_compute + t_launch + t_opt + t_comm      (no overlap: an upper bound)

Parallel efficiency at a fixed global batch (strong scaling) is E(W) = t_step(1) / (W t_step(W)); with a
fixed per-rank batch (weak scaling, global batch B W) it is t_step(1) / t_step(W) with F_b -> W F_b.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # achieved FLOP/s = peak x eta
    tau: float  # seconds per dispatched operator
    mem_bw: float  # bytes/s
    link_in: float  # bytes/s per direction between ranks of one node
    link_out: float  # bytes/s per node between nodes
    per_node: int  # ranks per node
    alpha: float = 5e-6  # seconds per ring step


# H100 SXM (inputs, not measurements): 67 TFLOP/s fp32 (no tensor cores; 990 TFLOP/s bf16 dense) at
# eta = 0.5; 3.35 TB/s HBM3; NVLink 4 450 GB/s per direction inside 8 GPUs; 400 Gb/s InfiniBand = 50 GB/s
# per node; tau = 5 us per eager PyTorch operator (launch + dispatch).
H100_FP32 = Device("H100 fp32", flops=0.5 * 67e12, tau=5e-6, mem_bw=3.35e12, link_in=450e9, link_out=50e9,
                   per_node=8)
H100_BF16 = Device("H100 bf16", flops=0.5 * 990e12, tau=5e-6, mem_bw=3.35e12, link_in=450e9, link_out=50e9,
                   per_node=8)


def allreduce_seconds(nbytes: float, world: int, dev: Device) -> float:
    """Hierarchical ring all-reduce: inside the node over NVLink, then between nodes over the node's link."""
    if world <= 1 or nbytes <= 0:
        return 0.0
    g = min(world, dev.per_node)
    n = math.ceil(world / dev.per_node)
    t = 2 * (g - 1) / g * nbytes / dev.link_in + 2 * (g - 1) * dev.alpha
    if n > 1:
        t += 2 * (n - 1) / n * nbytes / dev.link_out + 2 * (n - 1) * dev.alpha
    return t


def predict(profile: dict, dev: Device, world: int, sharded: bool = True, weak: bool = False) -> dict:
    """Predicted seconds of one step per part (see the module's formula). `profile`: bype.bench.perf.flops."""
    f_batch = profile["flops_batch"] * (world if weak else 1)
    t_compute = (f_batch / world + profile["flops_prior"] / (world if sharded else 1)) / dev.flops
    t_launch = profile["ops"] * dev.tau
    t_opt = profile["optimizer_bytes"] / dev.mem_bw
    t_comm = allreduce_seconds(profile["allreduce_bytes"], world, dev)
    if sharded and world > 1:
        t_comm += 1.5 * allreduce_seconds(profile["gather_bytes"], world, dev)
    total = t_compute + t_launch + t_opt + t_comm
    return {"world": world, "sharded": sharded, "weak": weak, "t_compute": t_compute, "t_launch": t_launch,
            "t_opt": t_opt, "t_comm": t_comm, "t_step": total}


def efficiency(profile: dict, dev: Device, world: int, sharded: bool = True, weak: bool = False) -> float:
    one = predict(profile, dev, 1, sharded, weak)["t_step"]
    t = predict(profile, dev, world, sharded, weak)["t_step"]
    return one / t if weak else one / (world * t)


def device_dict(dev: Device) -> dict:
    return asdict(dev)
