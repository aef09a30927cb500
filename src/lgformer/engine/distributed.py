"""One process or many (torchrun) with the same code: process-group set-up, sums across ranks, sharding.

Under `torchrun` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; we join the group with NCCL
on GPUs and gloo on CPU. Without it everything degrades to a world of one and the helpers are no-ops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from lgformer.errors import LGFormerError
from lgformer.precision import pick_device, tune_cpu_allocator


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from the torchrun environment (a world of one without it)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device: str = "auto") -> tuple[World, torch.device]:
    """Pick the device ('auto': this rank's GPU if there is one, else CPU) and join the process group
    when launched by torchrun. Returns where this process stands and its device."""
    w = world()
    dev = pick_device(device, w.local_rank)
    if dev.type == "cpu":
        tune_cpu_allocator()
    if w.size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return w, dev


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks (a copy; on NCCL the reduction runs on this rank's GPU)."""
    if not _active():
        return tensor.clone()
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    )
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def barrier() -> None:
    if _active():
        dist.barrier()


class TrainSampler(Sampler[int]):
    """This rank's sample indices for one epoch, in micro-batch order, resumable at any optimizer step.

    Epoch e shuffles all indices with seed `seed + e` (identical on every rank), drops the tail that does
    not fill a global batch, and cuts each global batch of `world * per_rank` samples into one contiguous
    block per rank. The global batch, and therefore the update, does not depend on the number of ranks.
    `set_epoch(e, start_step)` skips the first `start_step` global batches (exact resume).
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise LGFormerError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if size < global_batch:
            raise LGFormerError(
                f"the training set has {size} samples, fewer than one global batch ({global_batch})"
            )
        self.size = size
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for step in range(self.start_step, self.steps_per_epoch):
            begin = step * self.global_batch + self.rank * self.per_rank
            yield from order[begin : begin + self.per_rank].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.per_rank


def shard(size: int, w: World) -> list[int]:
    """Evaluation indices of this rank: every `w.size`-th one, no padding (counts are summed by index)."""
    return list(range(w.rank, size, w.size))
