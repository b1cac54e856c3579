"""The training loop of every model: AdamW, warm-up + cosine schedule, early stopping on a validation split
carved from the training slides, a checkpoint every epoch, exact resume, AMP on CUDA and DDP when
launched by torchrun.

:func:`fit` knows models only through :class:`gnnst.models.base.ExpressionModel` (``forward``,
``loss``, ``predict``, ``after_fit``, ``uses_halo``); it has no model-specific code.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

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
        ckpt_dir: ``last.pt`` (every epoch, for ``resume``) and ``best.pt`` are written here.
        resume: continue from ``ckpt_dir/last.pt`` when it exists; the result equals an uninterrupted run.

    The validation score is :func:`validation_score` of the model's default ``predict`` on the
    validation spots, after ``model.after_fit(train_graphs)`` (e.g. a retrieval bank of the training
    spots); without validation spots the training loss decides. The model ends holding the best epoch's
    weights, ``after_fit`` done.
    """
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from gnnst.graph.sampler import SubgraphLoader
    from gnnst.io import atomic_torch_save
    from gnnst.predictor import halo_hops, predict_graphs
    from gnnst.train.views import set_views

    tc = cfg.train
    device = device or torch.device("cpu")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model.to(device)
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)  # logit_scale is used in the loss, outside forward
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    use_amp = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loader = SubgraphLoader(train_graphs, batch_nodes=tc.batch_nodes, num_hops=halo_hops(model, tc.num_hops),
                            shuffle=True, seed=cfg.seed)
    val_y = [g.y[torch.from_numpy(m)].numpy() for g, m in zip(val_graphs, val_masks)]
    has_val = sum(len(v) for v in val_y) > 1

    start, best, best_epoch, history, bad = 0, -math.inf, -1, [], 0
    last = ckpt_dir / "last.pt" if ckpt_dir else None
    if resume and last is not None and last.is_file():
        try:
            st = torch.load(last, map_location=device, weights_only=False)
        except Exception as e:
            raise GnnstError(f"{last}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, best, best_epoch, history, bad = st["epoch"] + 1, st["best"], st["best_epoch"], st["history"], st["bad"]
        log.info("resumed from %s at epoch %d", last, start)
    t0, nodes_seen = time.perf_counter(), 0
    bar = tqdm(range(start, tc.epochs), desc="train", unit="epoch", disable=not progress or rank != 0, leave=False)
    for epoch in bar:
        if bad >= tc.patience:
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch seed: resume replays the same randomness
        loader.set_epoch(epoch)
        set_views(train_graphs, epoch, cfg.seed)  # x: one stain-augmented view per spot (features.stain_augment)
        groups = loader.batches_of_parts()
        if distributed:  # every rank gets the same number of batches (DDP needs matching steps)
            per_rank = -(-len(groups) // world)
            groups = [groups[(rank + world * j) % len(groups)] for j in range(per_rank)]
        net.train()
        tot, steps = 0.0, 0
        for i, group in enumerate(groups):
            b = loader.make_batch(group).to(device)
            for pg in opt.param_groups:
                pg["lr"] = tc.lr * lr_factor(epoch + i / max(len(groups), 1), tc.warmup_epochs, tc.epochs)
            with torch.autocast(device.type, enabled=use_amp):
                out = net(b)
                losses = model.loss(out, b)
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            tot += float(losses["total"].detach())
            steps += 1
            nodes_seen += int(b.center_mask.sum())
        set_views(train_graphs, None, cfg.seed)  # back to view 0: validation and after_fit see no augmentation
        rec = {"epoch": epoch, "loss": tot / max(steps, 1)}
        if has_val:
            model.eval()
            model.after_fit(train_graphs, batch_nodes=tc.batch_nodes)
            (preds,) = predict_graphs(model, val_graphs, batch_nodes=tc.batch_nodes, num_hops=tc.num_hops,
                                      device=device).values()
            rec["val_pcc"] = validation_score(val_y, [p[m] for p, m in zip(preds, val_masks)])
            score = rec["val_pcc"]
        else:
            score = -rec["loss"]
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            if rank == 0 and ckpt_dir is not None:
                atomic_torch_save({"model": model.state_dict(), "epoch": epoch}, ckpt_dir / "best.pt")
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", val=f"{rec.get('val_pcc', float('nan')):.3f}")
        if rank == 0 and last is not None:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                               "best": best, "best_epoch": best_epoch, "history": history, "bad": bad}, last)
    seconds = time.perf_counter() - t0
    if best_epoch >= 0:
        if "best_state" in locals():
            model.load_state_dict(best_state)
        elif ckpt_dir is not None and (ckpt_dir / "best.pt").is_file():
            model.load_state_dict(torch.load(ckpt_dir / "best.pt", map_location=device, weights_only=False)["model"])
    model.eval()
    model.after_fit(train_graphs, batch_nodes=tc.batch_nodes)
    return FitResult(best_epoch=best_epoch, best_score=float(best), history=history, seconds=seconds,
                     nodes_per_second=nodes_seen / max(seconds, 1e-9))
