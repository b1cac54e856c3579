"""Training losses: symmetric InfoNCE (open_clip style), masked reconstruction, and their sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data

from gnnst.errors import GnnstError
from gnnst.config import ModelConfig

LOGIT_SCALE_MAX = 100.0  # exp(logit_scale) is clamped here wherever it is used (open_clip: 100)
CENTER_MASK = "center_mask"  # optional Data attribute [N] bool: loss-bearing (non-halo) nodes
# optional Data attribute [C] int64: the positions of the True entries of center_mask, ascending (the
# samplers set it): selecting by it needs no host synchronisation, a boolean mask does
CENTER_INDEX = "center_index"


def clip_loss(z_a: Tensor, z_b: Tensor, logit_scale: Tensor) -> Tensor:
    r"""Symmetric InfoNCE with in-batch negatives: row ``i`` of ``z_a`` should match row ``i`` of
    ``z_b`` among all rows of the other side, and vice versa.

    Args:
        z_a: L2-normalised embeddings of one modality.
        z_b: L2-normalised embeddings of the other modality, row-aligned with ``z_a``.
        logit_scale: The learnable *log* temperature (``model.logit_scale``, initialised to
            ``log(1/0.07)``); the logits are cosine similarities times
            ``exp(logit_scale)`` clamped at 100.

    Shapes:
        - **input:** z_a ``[N, P]``, z_b ``[N, P]``, logit_scale ``[]``
        - **output:** ``[]``; ``log(N)`` for unrelated embeddings at scale 1, near 0 when aligned
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise GnnstError(f"clip_loss: z_a and z_b must both be [N, P], got {list(z_a.shape)} and {list(z_b.shape)}")
    scale = logit_scale.float().exp().clamp(max=LOGIT_SCALE_MAX)
    logits = scale * z_a.float() @ z_b.float().T  # [N, N]
    labels = torch.arange(z_a.size(0), device=z_a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def masked_recon_loss(y_rec: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    r"""Mean squared error on the hidden (masked) entries only; 0 when nothing is hidden.

    Shapes:
        - **input:** y_rec ``[N, G]``, y ``[N, G]``, mask ``[N, G]`` bool (True = hidden)
        - **output:** ``[]``
    """
    if not mask.any():
        return (y_rec * 0.0).sum()  # keeps the graph so backward() still works
    return F.mse_loss(y_rec[mask], y[mask].to(y_rec.dtype))


def _center_mask(batch: Data, n: int) -> Tensor | None:
    mask = getattr(batch, CENTER_MASK, None)
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise GnnstError(
            f"batch.center_mask: expected a bool tensor of shape [{n}], got {mask.dtype} {list(mask.shape)}"
        )
    if not mask.any():
        raise GnnstError("batch.center_mask: no centre node in this batch (all False)")
    return mask


def compute_losses(
    model: nn.Module, out: dict[str, Tensor], batch: Data, cfg: ModelConfig | None = None
) -> dict[str, Tensor]:
    """Weighted loss terms of one forward pass and their sum.

    Terms (each already multiplied by its weight; a term with weight 0 or a switched-off
    component is left out): ``'mse'`` (``y_hat`` vs ``y``), ``'clip_spot'`` (``z_img`` vs
    ``z_gene``), ``'clip_nbhd'`` (``z_img_nb`` vs ``z_gene_nb``), ``'recon'`` (``y_rec`` vs ``y``
    on the hidden genes), and ``'total'``. When ``batch.center_mask`` is present only the centre
    nodes count (halo nodes carry messages, not loss); they are also the in-batch negatives.

    Args:
        model: The model that produced ``out`` (its ``logit_scale`` is used).
        out: ``model(batch)``.
        batch: The batch, with ``y [N, G]`` and optionally ``center_mask [N]``.
        cfg: Switches and weights; ``model.cfg`` when ``None``. A component the model was built
            without (``model.cfg``, e.g. ``use_graph`` forced off by ``gnnst_mlp``) stays off
            whatever ``cfg`` says.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    built = getattr(model, "cfg", None)
    cfg = built if cfg is None else cfg

    def on(switch: str) -> bool:
        return getattr(cfg, switch) and (built is None or getattr(built, switch))

    y = batch.y
    if y is None:
        raise GnnstError("compute_losses: batch.y (expression) is missing; losses need training spots")
    y_hat = out["y_hat"]
    index = getattr(batch, CENTER_INDEX, None)  # the same rows as center_mask, in the same order
    mask = _center_mask(batch, y_hat.size(0)) if index is None else None

    def sel(t: Tensor) -> Tensor:
        if index is not None:
            return t.index_select(0, index)
        return t if mask is None else t[mask]

    def need(key: str, switch: str) -> Tensor:
        if key not in out:
            raise GnnstError(f"compute_losses: model.{switch} is on but the model output has no '{key}'")
        return sel(out[key])

    y_c = sel(y).to(y_hat.dtype)
    losses: dict[str, Tensor] = {}
    if cfg.w_mse > 0:
        losses["mse"] = cfg.w_mse * F.mse_loss(sel(y_hat), y_c)
    if on("use_contrastive") and cfg.w_clip_spot > 0:
        z_img, z_gene = need("z_img", "use_contrastive"), need("z_gene", "use_contrastive")
        losses["clip_spot"] = cfg.w_clip_spot * clip_loss(z_img, z_gene, model.logit_scale)
    nbhd = on("use_graph") and on("use_contrastive") and on("use_neighbourhood_scale")
    if nbhd and cfg.w_clip_nbhd > 0:
        z_img_nb = need("z_img_nb", "use_neighbourhood_scale")
        z_gene_nb = need("z_gene_nb", "use_neighbourhood_scale")
        losses["clip_nbhd"] = cfg.w_clip_nbhd * clip_loss(z_img_nb, z_gene_nb, model.logit_scale)
    if on("use_masked_recon") and cfg.w_recon > 0:
        y_rec, rmask = need("y_rec", "use_masked_recon"), need("recon_mask", "use_masked_recon")
        losses["recon"] = cfg.w_recon * masked_recon_loss(y_rec, y_c, rmask)
    if not losses:
        raise GnnstError("compute_losses: every loss term is off (all weights of active components are 0)")
    losses["total"] = torch.stack([v.float() for v in losses.values()]).sum()
    return losses
