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
head and the training objective; there is no regression head. Registered as ``bleep``
(``gnnst train model.name=bleep``); it implements :class:`~gnnst.models.base.ExpressionModel` and
trains in the same loop as every model.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data

from gnnst.config import ModelConfig
from gnnst.errors import GnnstError
from gnnst.models.base import centre_rows, check_xy
from gnnst.models.layers import ProjectionHead
from gnnst.models.registry import register_model
from gnnst.models.retrieval import RetrievalOnlyModel

class BLEEP(RetrievalOnlyModel):
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

    def loss(self, out: dict[str, Tensor], batch: Data) -> dict[str, Tensor]:
        r"""BLEEP's contrastive loss over the centre spots of ``batch``: ``{'contrastive', 'total'}``.

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
        loss = ((genes_loss + images_loss) / 2).mean()
        return {"contrastive": loss, "total": loss}

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


@register_model("bleep")
def _bleep(*, in_dim: int, num_genes: int, cfg: ModelConfig) -> BLEEP:
    """BLEEP-style comparison model: contrastive image/expression heads, retrieval with equal weights."""
    return BLEEP(in_dim, num_genes, cfg)
