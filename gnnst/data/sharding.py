"""Slides shared out over the processes of a ``torchrun`` launch (one machine or many).

Every rank embeds its own shard of the slides and caches each slide's embeddings as soon as it is
done; after a barrier every rank reads the others' from the cache (which every rank must see, as it
sees the data files). A rank that dies takes the launch down (torchrun stops the others); the slides it
finished are cached, and a rerun embeds only what is missing.

Without ``WORLD_SIZE > 1`` in the environment everything here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

# A barrier waits for the slowest rank to embed its shard: allow a cohort's worth of encoding.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Shard:
    rank: int = 0  # this process
    world: int = 1  # processes in the launch
    local_rank: int = 0  # this process on its machine (its GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Shard":
        """The launch torchrun describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (one process if unset)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def assign(sizes: Sequence[int], world: int) -> list[int]:
    """The rank of each item: largest first to the least loaded rank (deterministic, so every rank
    computes the same assignment; ties go to the lower rank)."""
    load = [0] * max(world, 1)
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(len(load)), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


@contextlib.contextmanager
def process_group(shard: Shard) -> Iterator[None]:
    """Join torchrun's process group for barriers (gloo, which every device supports) unless one is
    already set up (``gnnst train`` under torchrun); leave it on exit if it was joined here."""
    if shard.world <= 1:
        yield
        return
    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def barrier(shard: Shard) -> None:
    """Wait for every rank (no-op for one process)."""
    if shard.world <= 1:
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # a process group set up for training on GPUs
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
