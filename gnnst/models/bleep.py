"""A retrieval baseline in the manner of BLEEP (Xie et al., NeurIPS 2023), on frozen patch embeddings.

Written from the method's published description:

- two projection heads map the image of a spot and its expression profile into one space
  (BLEEP's residual head: linear, GELU, linear, dropout, skip, LayerNorm;
  :class:`~gnnst.models.layers.ProjectionHead`);
- the loss is CLIP's symmetric cross-entropy between the two sides of a batch, except that the
  targets are soft: the softmax of the mean of the image-image and expression-expression
  similarities, so that two spots with alike expression are not pushed apart as negatives;
  similarities are plain dot products of the (LayerNorm-ed, not L2-normalised) embeddings at
  temperature 1, and the targets are held constant in the gradient;
- prediction retrieves: the image embedding of a query spot is compared with the expression
  embeddings of all training spots (the bank), and the measured expression of the ``k`` most
  similar is averaged with equal weights.

Differences from the paper: the image side starts from the frozen patch embeddings that every
gnnst model uses (the paper fine-tunes a ResNet-50), so the comparison with gnnst isolates the
head and the training objective; there is no regression head. The model does not follow the
:class:`~gnnst.models.gnnst.GNNST` training contract (``y_hat`` plus
:func:`~gnnst.models.losses.compute_losses`), so it is not in the registry: train it with
:meth:`BLEEP.loss` (``benchmarks/accuracy.py`` does).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data

from gnnst.errors import GnnstError
from gnnst.models.config import ModelConfig
from gnnst.models.layers import ProjectionHead, RetrievalBankMixin

RETRIEVAL_CHUNK = 512  # query rows per similarity block in retrieval
RETRIEVAL_WEIGHTS = ("mean", "inverse_distance")  # how the top-k retrieved profiles are averaged


def retrieve_topk(query: Tensor, bank_z: Tensor, bank_y: Tensor, k: int, weights: str = "mean") -> Tensor:
    r"""Average of the measured expression of the ``k`` bank spots most similar to each query.

    Similarity is the dot product. ``weights="mean"`` averages the ``k`` profiles equally (BLEEP);
    ``"inverse_distance"`` weighs each by ``1 / ||query - bank||`` (mclSTExp).

    Shapes:
        - **input:** query ``[N, P]``, bank_z ``[M, P]``, bank_y ``[M, G]``
        - **output:** ``[N, G]``
    """
    if weights not in RETRIEVAL_WEIGHTS:
        raise GnnstError(f"retrieve_topk: weights must be one of {', '.join(RETRIEVAL_WEIGHTS)}, got {weights!r}")
    if bank_z.size(0) == 0:
        raise GnnstError("no retrieval bank: call model.build_retrieval_bank(...) with the training spots first")
    k = min(k, bank_z.size(0))
    query = query.to(bank_z)
    outs = []
    for q in query.split(RETRIEVAL_CHUNK):
        sim = q @ bank_z.T  # [n, M]
        top, idx = sim.topk(k, dim=1)  # [n, k]
        if weights == "mean":
            w = torch.full_like(top, 1.0 / k)
        else:
            d2 = (q * q).sum(1, keepdim=True) - 2 * top + (bank_z * bank_z).sum(1)[idx]  # [n, k] squared distances
            w = 1.0 / (d2.clamp_min(0).sqrt() + 1e-6)
            w = w / w.sum(1, keepdim=True)
        outs.append(torch.einsum("nk,nkg->ng", w, bank_y[idx]))  # [n, k, G] -> [n, G]
    return torch.cat(outs) if outs else query.new_zeros(0, bank_y.size(1))


def centre_rows(batch: Data) -> Tensor | None:
    """``batch.center_mask`` ``[N]`` bool when present (halo spots carry no loss), else ``None``."""
    mask = getattr(batch, "center_mask", None)
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (batch.num_nodes,)):
        raise GnnstError(f"batch.center_mask: expected a bool tensor of shape [{batch.num_nodes}]")
    return mask


def check_xy(batch: Data, in_dim: int, num_genes: int) -> tuple[Tensor, Tensor | None]:
    """``(x [N, in_dim], y [N, num_genes] or None)`` of ``batch``; a wrong shape raises naming the field."""
    x, y = batch.x, getattr(batch, "y", None)
    if x is None or x.dim() != 2 or x.size(1) != in_dim:
        raise GnnstError(f"batch.x: expected shape [N, {in_dim}] (model in_dim), got {None if x is None else list(x.shape)}")
    if y is not None and y.shape != (x.size(0), num_genes):
        raise GnnstError(f"batch.y: expected shape [{x.size(0)}, {num_genes}] (N, model num_genes), got {list(y.shape)}")
    return x, y


class RetrievalOnlyMixin(RetrievalBankMixin):
    """``predict`` of models without a regression head: top-k retrieval from the bank, weighted as the
    class attribute ``retrieval_weights`` says (see :func:`retrieve_topk`)."""

    retrieval_weights = "mean"

    @torch.no_grad()
    def predict(self, batch: Data, *, mode: str | None = None) -> Tensor:
        """Predicted expression ``[N, G]`` of every node by retrieval; ``batch.y`` is not used.

        ``mode`` may only be ``None`` or ``"retrieval"`` (the model has no regression head).
        Does not switch train/eval: call ``model.eval()`` first.
        """
        if mode not in (None, "retrieval"):
            raise GnnstError(f"{type(self).__name__}.predict: only mode='retrieval' exists (no regression head), "
                             f"got {mode!r}")
        x, _ = check_xy(batch, self.in_dim, self.num_genes)
        return retrieve_topk(self.encode_image(x), self.bank_z, self.bank_y, self.cfg.retrieval_k,
                             self.retrieval_weights)


class BLEEP(RetrievalOnlyMixin, nn.Module):
    r"""Bi-modal contrastive embedding with retrieval prediction (BLEEP-style).

    Args:
        in_dim: Width ``D`` of the patch embeddings ``x`` (from the data).
        num_genes: Number of genes ``G`` (from the data).
        cfg: Uses ``proj_dim`` (the shared space), ``dropout``, ``input_dropout`` and
            ``retrieval_k``; the other fields are ignored.

    Shapes:
        - **input:** a ``Data``/``Batch`` with x ``[N, D]``, optionally y ``[N, G]`` and
          center_mask ``[N]``
        - **output:** ``{'z_img': [N, P], 'z_gene': [N, P]}`` (``z_gene`` only with ``y``)
    """

    retrieval_weights = "mean"

    def __init__(self, in_dim: int, num_genes: int, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = ModelConfig(name="bleep") if cfg is None else cfg
        self.cfg, self.in_dim, self.num_genes = cfg, in_dim, num_genes
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.img_proj = ProjectionHead(in_dim, cfg.proj_dim, cfg.dropout)
        self.gene_proj = ProjectionHead(num_genes, cfg.proj_dim, cfg.dropout)
        self.register_buffer("bank_z", torch.zeros(0, cfg.proj_dim))  # [M, P] training spots' z_gene
        self.register_buffer("bank_y", torch.zeros(0, num_genes))  # [M, G] their expression

    def reset_parameters(self) -> None:
        self.img_proj.reset_parameters()
        self.gene_proj.reset_parameters()

    def encode_image(self, x: Tensor) -> Tensor:
        """``[N, D]`` -> ``z_img [N, P]``."""
        return self.img_proj(self.input_drop(x))

    def encode_genes(self, y: Tensor) -> Tensor:
        """``[M, G]`` -> ``z_gene [M, P]``."""
        return self.gene_proj(y)

    def forward(self, batch: Data) -> dict[str, Tensor]:
        x, y = check_xy(batch, self.in_dim, self.num_genes)
        out = {"z_img": self.encode_image(x)}
        if y is not None:
            out["z_gene"] = self.encode_genes(y.to(x.dtype))
        return out

    def loss(self, out: dict[str, Tensor], batch: Data) -> Tensor:
        r"""BLEEP's contrastive loss over the centre spots of ``batch``.

        ``logits = z_gene @ z_img.T``; ``targets = softmax((z_img @ z_img.T + z_gene @ z_gene.T) / 2)``;
        the mean of the cross-entropies of ``logits`` against ``targets`` (per expression row) and
        of ``logits.T`` against ``targets.T`` (per image row).
        """
        if "z_gene" not in out:
            raise GnnstError("BLEEP.loss: batch.y (expression) is missing; the loss needs training spots")
        mask = centre_rows(batch)
        zi, zg = (out["z_img"], out["z_gene"]) if mask is None else (out["z_img"][mask], out["z_gene"][mask])
        zi, zg = zi.float(), zg.float()
        logits = zg @ zi.T  # [n, n] expression rows, image columns
        targets = torch.softmax((zi @ zi.T + zg @ zg.T) / 2, dim=-1).detach()  # [n, n]
        genes_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(1)
        images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
        return ((genes_loss + images_loss) / 2).mean()

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def build_retrieval_bank(self, source: Tensor | Iterable[Data]) -> None:
        """Encode the training spots in eval mode and keep ``(z_gene, y)`` as the bank.

        ``source``: their expression ``[M, G]``, or batches with ``y`` (centre spots are kept).
        """
        was_training = self.training
        self.eval()
        try:
            if isinstance(source, Tensor):
                ys = list(source.to(self.bank_z).split(4096))
            else:
                ys = []
                for b in source:
                    _, y = check_xy(b, self.in_dim, self.num_genes)
                    if y is None:
                        raise GnnstError("build_retrieval_bank: a batch has no y (expression)")
                    mask = centre_rows(b)
                    ys.append((y if mask is None else y[mask]).to(self.bank_z))
            if not ys:
                raise GnnstError("build_retrieval_bank: no training spots given")
            self.bank_z = torch.cat([self.encode_genes(y) for y in ys])
            self.bank_y = torch.cat(ys).clone()
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_genes={self.num_genes}, proj_dim={self.cfg.proj_dim}, "
                f"retrieval_k={self.cfg.retrieval_k}, bank={self.bank_z.size(0)}")
