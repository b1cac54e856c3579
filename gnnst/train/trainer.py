"""The training loop: AdamW, warm-up + cosine schedule, early stopping on a validation split carved from
the training slides, a checkpoint every epoch, exact resume, AMP on CUDA and DDP when launched by torchrun.
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

log = logging.getLogger("gnnst")


@dataclass
class FitResult:
    """What :func:`fit` produced: the best epoch (by validation score) and the history."""

    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    nodes_per_second: float = 0.0


def carve_validation(graphs: Sequence["Data"], fraction: float, seed: int) -> list[np.ndarray]:
    """Per training slide, a ``[N]`` bool mask of validation spots: whole spatial blocks, about
    ``fraction`` of each slide, so validation spots are not surrounded by training spots."""
    from gnnst.train.sampler import spatial_tiles

    rng = np.random.default_rng(seed)
    masks = []
    for g in graphs:
        n = g.num_nodes
        mask = np.zeros(n, dtype=bool)
        if fraction > 0 and n >= 8:
            tiles = spatial_tiles(g.pos.numpy(), max(int(math.ceil(n * fraction / 2)), 1))
            for t in rng.permutation(len(tiles)):
                if mask.sum() >= fraction * n:
                    break
                mask[tiles[t]] = True
        masks.append(mask)
    return masks


def node_subgraph(g: "Data", keep: np.ndarray) -> "Data":
    """The graph restricted to nodes ``keep`` ``[N]`` bool (edges among them only)."""
    import torch
    from torch_geometric.data import Data

    k = torch.from_numpy(keep)
    remap = torch.full((g.num_nodes,), -1, dtype=torch.long)
    remap[k] = torch.arange(int(k.sum()))
    src, dst = g.edge_index
    e = k[src] & k[dst]
    out = Data(x=g.x[k], pos=g.pos[k], edge_index=remap[g.edge_index[:, e]], edge_attr=g.edge_attr[e],
               num_nodes=int(k.sum()))
    if getattr(g, "y", None) is not None:
        out.y = g.y[k]
    return out


def lr_factor(epoch_float: float, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` epochs, then cosine decay to 5% at ``total``."""
    if warmup > 0 and epoch_float < warmup:
        return (epoch_float + 1e-3) / warmup
    t = min(max((epoch_float - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))


def predict_graphs(model, graphs: Sequence["Data"], *, batch_nodes: int, num_hops: int, device,
                   mode: str | None = None) -> list[np.ndarray]:
    """Image-side predictions ``[N_s, G]`` for each graph, by halo subgraphs (any slide size).

    ``mode``: the model's ``predict`` mode (``"head"``, ``"retrieval"``, ``"blend"``; default its config).
    """
    import torch

    from gnnst.train.sampler import SubgraphLoader

    model.eval()
    outs = [np.zeros((g.num_nodes, model.num_genes), dtype=np.float32) for g in graphs]
    stripped = []
    for g in graphs:
        d = g.clone()
        d.y = None
        stripped.append(d)
    loader = SubgraphLoader(stripped, batch_nodes=batch_nodes, num_hops=num_hops)
    with torch.no_grad():
        for b in loader:
            b = b.to(device)
            p = model.predict(b, mode=mode)[b.center_mask].float().cpu().numpy()
            sl, nid = b.slide[b.center_mask].cpu().numpy(), b.node_id[b.center_mask].cpu().numpy()
            for s in np.unique(sl):
                outs[s][nid[sl == s]] = p[sl == s]
    return outs


def _val_score(y: list[np.ndarray], p: list[np.ndarray]) -> float:
    """Mean per-gene Pearson over the validation spots of all training slides (higher is better)."""
    from gnnst.eval.metrics import pearson_per_gene

    r = pearson_per_gene(np.concatenate(y), np.concatenate(p))
    return float(np.nanmean(r)) if np.isfinite(r).any() else -1.0


def fit(
    model: "torch.nn.Module",
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
    """Train ``model`` on ``train_graphs``; pick the epoch with the best validation score.

    Args:
        train_graphs: training part of each training slide (validation spots removed).
        val_graphs: the full training slides; ``val_masks`` ``[N]`` mark their validation spots, scored
            from the image side only (their expression is never an input).
        ckpt_dir: ``last.pt`` (every epoch, for ``resume``) and ``best.pt`` are written here.
        resume: continue from ``ckpt_dir/last.pt`` when it exists; the result equals an uninterrupted run.

    The model ends holding the best epoch's weights and a retrieval bank of the training spots.
    """
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from gnnst.io import atomic_torch_save
    from gnnst.models import compute_losses
    from gnnst.train.sampler import SubgraphLoader

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
    loader = SubgraphLoader(train_graphs, batch_nodes=tc.batch_nodes, num_hops=tc.num_hops, shuffle=True, seed=cfg.seed)
    y_train = torch.cat([g.y for g in train_graphs]).to(device)
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
                losses = compute_losses(model, out, b, cfg.model)
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            tot += float(losses["total"].detach())
            steps += 1
            nodes_seen += int(b.center_mask.sum())
        rec = {"epoch": epoch, "loss": tot / max(steps, 1)}
        if has_val:
            model.eval()
            if model.cfg.use_contrastive:
                model.build_retrieval_bank(y_train)
            preds = predict_graphs(model, val_graphs, batch_nodes=tc.batch_nodes, num_hops=tc.num_hops, device=device)
            rec["val_pcc"] = _val_score(val_y, [p[m] for p, m in zip(preds, val_masks)])
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
    if model.cfg.use_contrastive:
        model.build_retrieval_bank(y_train)
    return FitResult(best_epoch=best_epoch, best_score=float(best), history=history, seconds=seconds,
                     nodes_per_second=nodes_seen / max(seconds, 1e-9))
