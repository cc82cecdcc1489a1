"""Where a training process sits in a (possibly single-process) run, and its set-up under
torchrun: one process per GPU (nccl) or CPU slot (gloo), the node's cores shared out."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's rank among ``world_size`` (1: no DDP)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )


def init_distributed(device: str, threads_given: bool) -> tuple[Dist, str]:
    """Join the process group when run under torchrun; this process's Dist and device."""
    info = Dist.from_env()
    if info.world_size == 1:
        return info, device
    if not threads_given:
        # The processes on this node share its cores (several threads each would thrash).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    if device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info, device


def finish_distributed(info: Dist) -> None:
    if info.world_size > 1:
        dist.destroy_process_group()
