"""Distributed set-up when launched by ``torchrun`` (gloo; NCCL for ``ddp`` on CUDA), a no-op otherwise.

Two ways to use the ranks (``train.distributed``):

- ``folds`` (default): the models of a run are independent (ensemble members, per fold and for the
  final model), so each rank trains its share of them, one model per rank at a time, with no gradient
  exchange. Cross-validation's (fold, member) units are cut into contiguous blocks, one per rank
  (:func:`spread_units`), so a rank prepares only the folds it trains (gene panel, targets, stain
  re-embedding); each trained member is written to its fold's folder, the rank holding a fold's member 0
  assembles and scores that fold from those files, and every rank then reads the folds' results back
  (:func:`gnnst.eval.crossval.run_crossval`): the output folder must be on a filesystem every rank sees
  (always so on one machine). The final model's members are spread as member ``i`` on rank ``i % world``
  (:func:`my_share`) and gathered through the process group (:func:`gather`). The numbers are those of
  one process: each member has its own seed and sees only its own batches.
- ``ddp``: every model is trained by all ranks with its gradients all-reduced (one model too large, or
  too slow, for one device; :func:`gnnst.train.trainer.fit`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

WAIT_HOURS = 24  # how long a rank waits at a barrier (torch's default is 10-30 min)


@dataclass
class DistInfo:
    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node (selects the GPU)

    @property
    def is_main(self) -> bool:
        """Only the main process writes outputs."""
        return self.rank == 0


def init_distributed(device_spec: str = "auto", mode: str = "folds") -> DistInfo:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1), else do nothing.

    ``mode`` (``train.distributed``): ``folds`` exchanges only barriers and pickled results, so it uses
    gloo on every device, and ranks may share a GPU (rank ``LOCAL_RANK`` takes GPU ``LOCAL_RANK % GPUs``:
    several small models side by side keep one GPU busier than one); ``ddp`` all-reduces gradients with
    NCCL on CUDA and needs a GPU per rank on the machine (else a one-line error before joining)."""
    import torch
    import torch.distributed as dist

    from gnnst.errors import GnnstError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    gpus = torch.cuda.device_count() if use_cuda else 0
    nccl = use_cuda and mode == "ddp"
    if nccl and local >= gpus:
        raise GnnstError(f"config key 'train.distributed': ddp needs one GPU per rank, but local rank {local} "
                         f"has none ({gpus} GPU(s) here): start at most {gpus} ranks per machine "
                         f"(torchrun --nproc_per_node {gpus}), or use train.distributed=folds, whose ranks may "
                         f"share a GPU")
    if not dist.is_initialized():  # a rank done with its folds waits for the others: hours, not minutes
        dist.init_process_group(backend="nccl" if nccl else "gloo", timeout=datetime.timedelta(hours=WAIT_HOURS))
    if use_cuda:
        torch.cuda.set_device(local % gpus)
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


def barrier() -> None:
    """Wait for every rank (no-op when not distributed): e.g. all have checked an output folder before
    rank 0 starts writing into it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def my_share(n: int, mode: str = "folds") -> list[int]:
    """Which of ``n`` independent models this rank trains: ``i`` with ``i % world == rank`` under
    ``mode == "folds"`` and torchrun; all of them otherwise (one process, or ``ddp``: every rank takes
    part in every model)."""
    info = current()
    if mode != "folds" or info.world_size == 1:
        return list(range(n))
    return [i for i in range(n) if i % info.world_size == info.rank]


def spread_units(n_folds: int, n_members: int, world: int) -> list[list[tuple[int, int]]]:
    """The (fold, member) units of a cross-validation, fold-major, cut into ``world`` contiguous blocks whose
    sizes differ by at most one: block ``r`` is rank ``r``'s. A rank so prepares about
    ``n_folds / world + 1`` folds; the owner of fold ``f`` (who assembles it) is the rank holding ``(f, 0)``."""
    units = [(f, i) for f in range(n_folds) for i in range(n_members)]
    q, r = divmod(len(units), world)
    blocks, a = [], 0
    for k in range(world):
        b = a + q + (1 if k < r else 0)
        blocks.append(units[a:b])
        a = b
    return blocks


def gather(local: dict[int, Any], n: int, mode: str = "folds") -> list[Any]:
    """The results of models ``0..n-1`` in order, from the ranks that trained them (``local``: this rank's,
    by model number; :func:`my_share`). Pickled through the process group (``all_gather_object``); a
    no-op gather when there is one process."""
    info = current()
    if mode != "folds" or info.world_size == 1:
        return [local[i] for i in range(n)]
    import torch.distributed as dist

    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, local)
    merged = {k: v for part in parts for k, v in part.items()}
    missing = [i for i in range(n) if i not in merged]
    if missing:  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"models {missing} were trained by no rank")
    return [merged[i] for i in range(n)]
