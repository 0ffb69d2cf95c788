"""torchrun setup: the process group, and what the ranks must agree on.

``torchrun --nproc_per_node=N -m lmtrain train --config C`` sets RANK, WORLD_SIZE and LOCAL_RANK
in each process; we read them, join the process group (NCCL on CUDA, gloo on CPU) and give each
process its own GPU. Without those variables everything runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmtrain.errors import LmtrainError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        """Processes on this machine (torchrun's LOCAL_WORLD_SIZE; all of them without it)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) if self.enabled else 1


def from_environment() -> DistInfo:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    try:
        return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")),
                        int(os.environ["WORLD_SIZE"]))
    except ValueError:
        raise LmtrainError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (set by torchrun)") from None


def init(info: DistInfo, device_type: str) -> None:
    """Join the process group; every rank must call this."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (so every rank takes the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Each of ``values``' largest value over the ranks (so that decisions made from timings agree)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def check_ranks_agree(model: torch.nn.Module, optimizer, info: DistInfo, device: torch.device) -> str:
    """Raise if the ranks have drifted apart (a bug); return what was compared, for the log.

    Under DDP every rank holds the same weights, and they are compared. Under FSDP each rank holds
    other shards, so what must agree instead is what every rank keeps whole: the optimiser's step
    counts (a rank that skipped or repeated an update differs there) and the model's buffers.
    """
    from lmtrain.fsdp import is_sharded, local_scalars

    with torch.no_grad():
        if is_sharded(model):
            values = local_scalars(optimizer) + [b.double().sum().item() for b in model.buffers()]
            sums, what = torch.tensor(values or [0.0], dtype=torch.float64), "ranks agree on the optimiser's step counts and buffers (weights are sharded)"
        else:
            sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
            what = "replicas hold identical weights"
    sums = sums.to(device)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"the {info.world_size} ranks have diverged: {what.split(' (')[0]} no longer holds")
    return what
