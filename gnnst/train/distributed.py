"""Distributed set-up: DDP when launched by ``torchrun`` (NCCL on CUDA, gloo on CPU), a no-op otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node (selects the GPU)

    @property
    def is_main(self) -> bool:
        """Only the main process writes outputs."""
        return self.rank == 0


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1), else do nothing."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def current() -> DistInfo:
    """The process group this process is in (rank 0 of 1 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
