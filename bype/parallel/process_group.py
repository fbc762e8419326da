"""Process-group set-up and the few collectives the trainer needs.

One code path for a single process, torchrun DDP and DeepSpeed: `init_distributed` reads the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK); without it everything degrades to no-ops.
`check_replicated` verifies that state every rank must hold alike (the coreset) is bitwise identical.
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one: the one place every module
    (coreset, evaluation, data streams) reads them from, so that a DistContext and the group never disagree."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(cfg) -> DistContext:
    """Join the process group when launched by torchrun (or when dist.engine asks for one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, store=_elastic_store(rank, world))
    return DistContext(rank, world, local_rank, device)


def _elastic_store(rank: int, world: int):
    """torchrun's agents keep one TCPStore across elastic restarts, holding the dead workers' addresses,
    which a restarted process group can read instead of the new ones. With a single agent the restart
    count names the attempt, so a prefix keeps attempts apart. Across nodes the agents' counts can differ:
    there a fresh store per restart (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as launch/ sets) is the fix."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0:
            warnings.warn("elastic restarts across nodes with torchrun's shared store can hang after a restart; "
                          "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (launch/*.sh do)")
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
    return dist.PrefixStore(f"bype/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_over_ranks(values: list[float]) -> list[float]:
    """Float64 sums of per-rank partial sums of a few numbers (on the backend's communication device)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        t = all_reduce_sum(t.to(comm_device()))
    return t.cpu().tolist()


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src)
    return t


def finish(exit_code: int = 0) -> None:
    """End a distributed worker cleanly: gloo can abort at interpreter exit otherwise."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


class ReplicaMismatchError(RuntimeError):
    """State that must be identical on every rank (the coreset, the initial model) has diverged."""


def tensor_digest(t: torch.Tensor) -> int:
    """A 63-bit hash of a tensor's dtype, shape and exact bytes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    data = t.detach().cpu().contiguous()
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1  # fits a signed int64


def comm_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_replicated(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Stop every rank with one clear error when `tensors` are not bitwise identical to rank 0's.

    Every rank all-gathers the hashes, so all of them see the same verdict and raise together
    (a rank that carried on alone would hang in the next collective). No-op in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    names = sorted(tensors)
    mine = torch.tensor([tensor_digest(tensors[n]) for n in names], dtype=torch.int64, device=comm_device())
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    bad_ranks, bad_names = [], set()
    for r, digests in enumerate(gathered[1:], start=1):
        differ = (digests != gathered[0]).nonzero().flatten().tolist()
        if differ:
            bad_ranks.append(r)
            bad_names.update(names[i] for i in differ)
    if bad_ranks:
        raise ReplicaMismatchError(f"{what}: {', '.join(sorted(bad_names))} on rank(s) "
                                   f"{', '.join(map(str, bad_ranks))} differ from rank 0; the ranks have diverged")
