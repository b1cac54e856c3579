"""The training loop of every model: AdamW, warm-up + cosine schedule, early stopping on a validation split
carved from the training slides, checkpoints every ``train.checkpoint_every_s`` seconds and after the last
epoch, exact resume, mixed precision on CUDA and, with ``train.distributed: ddp`` under torchrun, DDP.

A step is bound by the device, not the host, where the device allows (:func:`make_loader`): on CUDA the
slides stay on the device and each epoch's halo subgraphs are cut there at once
(:class:`gnnst.graph.device_sampler.DeviceSubgraphLoader`); the loss is summed on the device and read once
per epoch; bfloat16 autocast needs no gradient scaler (whose overflow check reads back every step).
On the CPU the host sampler and the step are those of before.

:func:`fit` knows models only through :class:`gnnst.models.base.ExpressionModel` (``forward``,
``loss``, ``predict``, ``after_fit``, ``uses_halo``); it has no model-specific code.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from gnnst import keys

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch
    from torch_geometric.data import Data

    from gnnst.config import Config
    from gnnst.models.base import ExpressionModel

log = logging.getLogger("gnnst")


@dataclass
class FitResult:
    """What :func:`fit` produced: the best epoch (by validation score) and the history."""

    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    nodes_per_second: float = 0.0


CPU_BATCH_NODES = 512  # train.batch_nodes: null on a CPU
CUDA_BATCH_NODES = 2048  # ... on a GPU: fewer, larger steps keep it busy (the step's cost is mostly per call)
DEVICE_MEMORY_SHARE = 0.5  # sampler "auto": slides on the GPU when they take at most this share of its free memory


def default_batch_nodes(device) -> int:
    """``train.batch_nodes`` when it is null: :data:`CUDA_BATCH_NODES` on CUDA, :data:`CPU_BATCH_NODES` else."""
    return CUDA_BATCH_NODES if getattr(device, "type", str(device)) == "cuda" else CPU_BATCH_NODES


def resolve_batch_nodes(cfg: "Config", device) -> int:
    """Set ``cfg.train.batch_nodes`` left at null to the device's default (so outputs record the number)."""
    if cfg.train.batch_nodes is None:
        cfg.train.batch_nodes = default_batch_nodes(device)
        log.info("train.batch_nodes = %d (the default on %s)", cfg.train.batch_nodes, getattr(device, "type", device))
    return cfg.train.batch_nodes


def amp_dtype(device) -> "torch.dtype | None":
    """Autocast dtype on ``device``: bfloat16 on CUDA where supported, else float16; ``None`` off CUDA."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_loader(graphs: Sequence["Data"], cfg: "Config", device, *, num_hops: int, shuffle: bool, seed: int = 0,
                centre_masks: Sequence[np.ndarray] | None = None):
    """The sampler of ``train.sampler`` for ``graphs``: :class:`~gnnst.graph.sampler.SubgraphLoader` (host)
    or :class:`~gnnst.graph.device_sampler.DeviceSubgraphLoader` (slides on ``device``); ``auto`` takes the
    device one on CUDA when the slides fit in :data:`DEVICE_MEMORY_SHARE` of its free memory. Both give
    the same batches. ``centre_masks``: ``[N]`` bool per graph, the only nodes batches are centred on."""
    import torch

    from gnnst.graph.device_sampler import DeviceSubgraphLoader, device_bytes
    from gnnst.graph.sampler import SubgraphLoader

    device = torch.device(device)
    batch_nodes = cfg.train.batch_nodes or default_batch_nodes(device)
    kind = cfg.train.sampler
    if kind == "auto":
        kind = "host"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            need = device_bytes(graphs)
            kind = "device" if need <= DEVICE_MEMORY_SHARE * free else "host"
            if kind == "host":
                log.info("sampler: the slides (%.1f GB) do not fit in half the GPU's free memory (%.1f GB): "
                         "batches are cut on the host", need / 1e9, free / 1e9)
    if kind == "device":
        return DeviceSubgraphLoader(graphs, batch_nodes=batch_nodes, num_hops=num_hops, shuffle=shuffle, seed=seed,
                                    device=device, centre_masks=centre_masks)
    return SubgraphLoader(graphs, batch_nodes=batch_nodes, num_hops=num_hops, shuffle=shuffle, seed=seed,
                          centre_masks=centre_masks)


def validation_loader(model: "ExpressionModel", graphs: Sequence["Data"], masks: Sequence[np.ndarray], cfg: "Config",
                      device):
    """The sampler that predicts the validation spots ``masks`` (``[N]`` bool per graph) of ``graphs`` from
    the image side: batches centred on them alone, the rest of the slides as their halo."""
    from gnnst.predictor import halo_hops, image_side

    return make_loader(image_side(graphs), cfg, device, num_hops=halo_hops(model, cfg.train.num_hops), shuffle=False,
                       centre_masks=masks)


def batches(loader, groups: list, device) -> "Iterator[Data]":
    """The batches of ``groups`` on ``device``: cut there (device loader), or on the host and copied
    without blocking the host."""
    if hasattr(loader, "iter_batches"):
        yield from loader.iter_batches(groups)
        return
    for group in groups:
        yield loader.make_batch(group).to(device, non_blocking=True)


def make_optimizer(model: "ExpressionModel", tc) -> "torch.optim.Optimizer":
    """AdamW over ``model``'s parameters with ``train.lr`` and ``train.weight_decay`` (``tc``: the train config).
    The fused update (the whole AdamW step in one kernel per parameter) on a CPU or CUDA, else the
    multi-tensor (``foreach``) one: the same updates as the per-parameter loop up to float rounding (tested).
    On 2 CPU cores, with the her2st-sized default model, 7 against 30 ms a step for the ``foreach`` update
    (torch profiler, 6 steps)."""
    import torch

    params = list(model.parameters())
    fused = bool(params) and params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                             **({"fused": True} if fused else {"foreach": True}))


def lr_factor(epoch_float: float, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` epochs, then cosine decay to 5% at ``total``."""
    if warmup > 0 and epoch_float < warmup:
        return (epoch_float + 1e-3) / warmup
    t = min(max((epoch_float - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))


def validation_score(y: list[np.ndarray], p: list[np.ndarray]) -> float:
    """Mean per-gene Pearson over the validation spots of all training slides (higher is better); the
    score that picks the epoch, the checkpoint and the blend weight."""
    from gnnst.metrics import pearson_per_gene

    r = pearson_per_gene(np.concatenate(y), np.concatenate(p))
    return float(np.nanmean(r)) if np.isfinite(r).any() else -1.0


def fit(
    model: "ExpressionModel",
    train_graphs: Sequence["Data"],
    val_graphs: Sequence["Data"],
    val_masks: Sequence[np.ndarray],
    cfg: "Config",
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    device=None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` (any registered model) on ``train_graphs``; pick the epoch with the best validation score.

    Args:
        train_graphs: training part of each training slide (validation spots removed).
        val_graphs: the full training slides; ``val_masks`` ``[N]`` mark their validation spots, scored
            from the image side only (their expression is never an input).
        ckpt_dir: ``last.pt`` (for ``resume``: weights, optimiser, history) and ``best.pt`` (the best
            epoch's weights) are written here every ``train.checkpoint_every_s`` seconds and after the
            last epoch (``best.pt`` first, so ``last.pt`` never names a best epoch that is not on disk).
        resume: continue from ``ckpt_dir/last.pt`` when it exists: the epochs after it are replayed with
            the same per-epoch seeds, so the result equals an uninterrupted run.

    The validation score is :func:`validation_score` of the model's default ``predict`` on the
    validation spots, after ``model.after_fit(train_graphs)`` (e.g. a retrieval bank of the training
    spots); without validation spots the training loss decides. The model ends holding the best epoch's
    weights, ``after_fit`` done.
    """
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from gnnst.io import atomic_torch_save
    from gnnst.predictor import halo_hops, predict_graphs
    from gnnst.train.views import set_views

    tc = cfg.train
    device = torch.device(device or "cpu")
    batch_nodes = tc.batch_nodes or default_batch_nodes(device)
    ddp = tc.distributed == "ddp" and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    writes = rank == 0  # under "folds" every rank trains (and writes) its own models
    model.to(device)
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)  # logit_scale is used in the loss, outside forward
    opt = make_optimizer(model, tc)
    autocast = amp_dtype(device) if tc.amp else None
    # float16 needs loss scaling (whose overflow check reads back every step); bfloat16 does not
    scaler = torch.amp.GradScaler("cuda", enabled=autocast == torch.float16)
    views = any(getattr(g, keys.DATA_X_VIEWS, None) is not None for g in train_graphs)
    loader = make_loader(train_graphs, cfg, device, num_hops=halo_hops(model, tc.num_hops), shuffle=True, seed=cfg.seed)
    val_y = [g.y[torch.from_numpy(m)].numpy() for g, m in zip(val_graphs, val_masks)]
    has_val = sum(len(v) for v in val_y) > 1
    val_loader = validation_loader(model, val_graphs, val_masks, cfg, device) if has_val else None

    start, best, best_epoch, history, bad = 0, -math.inf, -1, [], 0
    best_state, best_saved = None, -1  # the best epoch's weights; the epoch whose weights best.pt holds
    last = ckpt_dir / "last.pt" if ckpt_dir else None
    if resume and last is not None and last.is_file():
        try:
            st = torch.load(last, map_location=device, weights_only=False)
        except Exception as e:
            raise GnnstError(f"{last}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, best, best_epoch, history, bad = st["epoch"] + 1, st["best"], st["best_epoch"], st["history"], st["bad"]
        best_state, best_saved = _resume_best(ckpt_dir / "best.pt", best_epoch, start, device)
        log.info("resumed from %s at epoch %d", last, start)
    saved_at = time.perf_counter()
    t0, nodes_seen = time.perf_counter(), 0
    bar = tqdm(range(start, tc.epochs), desc="train", unit="epoch", disable=not progress or rank != 0, leave=False)
    for epoch in bar:
        if bad >= tc.patience:
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch seed: resume replays the same randomness
        loader.set_epoch(epoch)
        set_views(train_graphs, epoch, cfg.seed)  # x_pick: one stain-augmented view per spot (features.stain_augment)
        if views and hasattr(loader, "refresh_x"):  # the epoch's views to the device, slide by slide
            loader.refresh_x(train_graphs)
        groups = loader.batches_of_parts()
        if ddp:  # every rank gets the same number of batches (DDP needs matching steps)
            per_rank = -(-len(groups) // world)
            groups = [groups[(rank + world * j) % len(groups)] for j in range(per_rank)]
        net.train()
        total, steps = train_epoch(net, model, loader, groups, opt, scaler, device=device, autocast=autocast,
                                   lr=lambda i: tc.lr * lr_factor(epoch + i / max(len(groups), 1), tc.warmup_epochs,
                                                                  tc.epochs))
        set_views(train_graphs, None, cfg.seed)  # back to view 0: validation and after_fit see no augmentation
        nodes_seen += sum(len(c) for grp in groups for _, c in grp)
        rec = {"epoch": epoch, "loss": float(total) / max(steps, 1)}  # the epoch's one read-back of the loss
        if has_val:
            model.eval()
            model.after_fit(train_graphs, batch_nodes=batch_nodes)
            (preds,) = predict_graphs(model, val_graphs, batch_nodes=batch_nodes, num_hops=tc.num_hops,
                                      device=device, loader=val_loader, masks=val_masks).values()
            rec["val_pcc"] = validation_score(val_y, preds)
            score = rec["val_pcc"]
        else:
            score = -rec["loss"]
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", val=f"{rec.get('val_pcc', float('nan')):.3f}")
        ends = epoch == tc.epochs - 1 or bad >= tc.patience
        if writes and last is not None and (ends or time.perf_counter() - saved_at >= tc.checkpoint_every_s):
            if best_state is not None and best_saved != best_epoch:
                atomic_torch_save({"model": best_state, "epoch": best_epoch}, ckpt_dir / "best.pt")
                best_saved = best_epoch
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                               "best": best, "best_epoch": best_epoch, "history": history, "bad": bad}, last)
            saved_at = time.perf_counter()
    seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    model.after_fit(train_graphs, batch_nodes=batch_nodes)
    return FitResult(best_epoch=best_epoch, best_score=float(best), history=history, seconds=seconds,
                     nodes_per_second=nodes_seen / max(seconds, 1e-9))


def _resume_best(path: Path, best_epoch: int, start: int, device) -> tuple[dict | None, int]:
    """The best epoch's weights from ``best.pt`` on resume (``best_epoch`` from ``last.pt``; ``start``: the
    first epoch to run): ``(state, its epoch)``, or ``(None, -1)`` when there is no best epoch yet. A
    ``best.pt`` newer than ``last.pt`` (a run stopped between the two writes, whose older best weights it
    replaced) is taken as it is, with a warning: the replay of the epochs after ``last.pt`` reaches its
    epoch again and, being deterministic, stores the same weights there."""
    import torch

    if best_epoch < 0:
        return None, -1
    if not path.is_file():
        raise GnnstError(f"{path}: missing, but {path.parent / 'last.pt'} names epoch {best_epoch} as the best "
                         f"(resume with the member's folder as written, or start it again without --resume)")
    try:
        st = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise GnnstError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
    if st["epoch"] != best_epoch and st["epoch"] < start:
        raise GnnstError(f"{path}: holds epoch {st['epoch']}, but {path.parent / 'last.pt'} names epoch "
                         f"{best_epoch} as the best (files of different runs?)")
    if st["epoch"] != best_epoch:
        log.warning("%s holds epoch %d, newer than last.pt (stopped between the two writes); using it as the "
                    "best weights until the replay passes that epoch", path, st["epoch"])
    return st["model"], int(st["epoch"])


def train_epoch(net, model: "ExpressionModel", loader, groups: list, opt, scaler, *, device, autocast=None,
                lr=None, max_steps: int | None = None) -> tuple["torch.Tensor", int]:
    """One pass of optimiser steps over the batches of ``groups`` (``loader.batches_of_parts()``).

    Args:
        net: what is called on a batch (``model``, or its DDP wrapper); ``model.loss`` gives the losses.
        autocast: dtype of mixed precision (:func:`amp_dtype`), ``None`` = off.
        lr: step number -> learning rate (``None``: leave it).
        max_steps: stop after this many steps (benchmarks).

    Returns ``(summed loss, steps)``: the sum stays on the device as float64 (no read-back per step; the
    same number as summing each step's loss on the host).
    """
    import torch

    total = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    for i, b in enumerate(batches(loader, groups, device)):
        if max_steps is not None and i >= max_steps:
            break
        if lr is not None:
            for pg in opt.param_groups:
                pg["lr"] = lr(i)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = net(b)
            losses = model.loss(out, b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        total += losses["total"].detach().double()
        steps += 1
    return total, steps
