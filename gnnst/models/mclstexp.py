"""A retrieval baseline in the manner of mclSTExp (Min et al., Briefings in Bioinformatics 2024).

Written from the method's published description: spots are read like words of a sentence.

- expression side: each spot's expression profile is embedded by a linear layer, a learnable
  embedding of its x and y position is added, and a transformer encoder lets the spots of a
  batch attend to one another; a projection head maps the result into the shared space;
- image side: a projection head on the spot's patch embedding;
- loss: symmetric InfoNCE between the two sides over the spots of a batch
  (:func:`~gnnst.models.losses.clip_loss`, learnable temperature);
- prediction retrieves: the ``k`` training spots whose expression embeddings are most similar
  to the query's image embedding, their measured expression averaged with weights inversely
  proportional to the embedding distance.

There is no spatial graph: the batch is the sentence (here a spatial tile of the
:class:`~gnnst.graph.sampler.SubgraphLoader`; the model sets ``uses_halo = False``, so tiles come
without a halo; each tile of a packed batch is its own sentence). Positions are binned at ``model.edge_scale_um`` and counted from the tile's
lower-left spot, so they mean the same on any slide (the paper embeds the array coordinates of the
slide). Differences from the paper: frozen patch embeddings on the image side (the paper
fine-tunes a DenseNet-121), no regression head. Registered as ``mclstexp``
(``gnnst train model.name=mclstexp``), trained in the same loop as every model.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.utils import to_dense_batch

from gnnst.config import ModelConfig
from gnnst.errors import GnnstError
from gnnst.models.base import centre_rows, check_xy
from gnnst.models.layers import ProjectionHead
from gnnst.models.losses import clip_loss
from gnnst.models.registry import register_model
from gnnst.models.retrieval import RetrievalOnlyModel, bank_centre_masks

NUM_POS_BINS = 64  # learnable position embeddings per axis; farther bins share the last one


class MclSTExp(RetrievalOnlyModel):
    r"""Transformer over the spots of a batch on the expression side, contrastive alignment with
    the image side, retrieval with inverse-distance weights.

    Args:
        in_dim: Width ``D`` of the patch embeddings ``x`` (from the data).
        num_genes: Number of genes ``G`` (from the data).
        cfg: Uses ``hidden`` (transformer width), ``heads``, ``num_layers`` (transformer layers),
            ``proj_dim``, ``dropout``, ``input_dropout``, ``edge_scale_um`` (position bin) and
            ``retrieval_k``.

    Shapes:
        - **input:** a ``Data``/``Batch`` with x ``[N, D]``, pos ``[N, 2]`` (µm; needed with y),
          optionally y ``[N, G]`` and center_mask ``[N]``
        - **output:** ``{'z_img': [N, P], 'z_gene': [N, P]}``, L2-normalised (``z_gene`` only with ``y``)
    """

    retrieval_weights = "inverse_distance"

    def __init__(self, in_dim: int, num_genes: int, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = ModelConfig(name="mclstexp") if cfg is None else cfg
        self.cfg, self.in_dim, self.num_genes = cfg, in_dim, num_genes
        H, P = cfg.hidden, cfg.proj_dim
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.img_proj = ProjectionHead(in_dim, P, cfg.dropout)
        self.gene_in = nn.Linear(num_genes, H)
        self.pos_x = nn.Embedding(NUM_POS_BINS, H)
        self.pos_y = nn.Embedding(NUM_POS_BINS, H)
        layer = nn.TransformerEncoderLayer(H, cfg.heads, dim_feedforward=2 * H, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.spot_encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.gene_proj = ProjectionHead(H, P, cfg.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("bank_z", torch.zeros(0, P))  # [M, P] training spots' z_gene
        self.register_buffer("bank_y", torch.zeros(0, num_genes))  # [M, G] their expression

    def reset_parameters(self) -> None:
        self.img_proj.reset_parameters()
        self.gene_in.reset_parameters()
        self.pos_x.reset_parameters()
        self.pos_y.reset_parameters()
        for layer in self.spot_encoder.layers:
            for m in layer.modules():
                if m is not layer and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.gene_proj.reset_parameters()
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))

    def encode_image(self, x: Tensor) -> Tensor:
        """``[N, D]`` -> ``z_img [N, P]``, L2-normalised."""
        return F.normalize(self.img_proj(self.input_drop(x)), dim=-1)

    def encode_spots(self, y: Tensor, pos: Tensor, sentence: Tensor | None = None) -> Tensor:
        """Expression side ``z_gene [N, P]`` (L2-normalised) of ``y [N, G]`` at ``pos [N, 2]`` (µm).

        ``sentence`` ``[N]`` (sorted, like PyG's ``batch``) says which spots attend to one
        another; ``None`` = all of them.
        """
        n = y.size(0)
        sentence = y.new_zeros(n, dtype=torch.long) if sentence is None else sentence
        pos_d, valid = to_dense_batch(pos.to(y.dtype), sentence, fill_value=math.inf)  # [B, L, 2], [B, L]
        origin = pos_d.amin(dim=1, keepdim=True)  # [B, 1, 2] lower-left of each sentence
        bins = ((pos_d - origin) / self.cfg.edge_scale_um).floor()[valid]  # [N, 2]
        bins = bins.clamp(0, NUM_POS_BINS - 1).long()
        h = self.gene_in(y) + self.pos_x(bins[:, 0]) + self.pos_y(bins[:, 1])  # [N, H]
        h_d, _ = to_dense_batch(h, sentence)  # [B, L, H]
        h = self.spot_encoder(h_d, src_key_padding_mask=~valid)[valid]  # [B, L, H] -> [N, H]
        return F.normalize(self.gene_proj(h), dim=-1)

    def _sentence(self, batch: Data, n: int) -> Tensor | None:
        sentence = getattr(batch, "batch", None)
        if sentence is not None and (sentence.shape != (n,) or (sentence.diff() < 0).any()):
            raise GnnstError(f"batch.batch: expected a sorted [{n}] graph index, as PyG's Batch has")
        return sentence

    def forward(self, batch: Data) -> dict[str, Tensor]:
        x, y = check_xy(batch, self.in_dim, self.num_genes)
        out = {"z_img": self.encode_image(x)}
        if y is not None:
            pos = getattr(batch, "pos", None)
            if pos is None or pos.shape != (x.size(0), 2):
                raise GnnstError(f"batch.pos: expected shape [{x.size(0)}, 2] (µm), the expression side needs positions")
            out["z_gene"] = self.encode_spots(y.to(x.dtype), pos, self._sentence(batch, x.size(0)))
        return out

    def loss(self, out: dict[str, Tensor], batch: Data) -> dict[str, Tensor]:
        """Symmetric InfoNCE between ``z_img`` and ``z_gene`` over the centre spots of ``batch``:
        ``{'contrastive', 'total'}``."""
        if "z_gene" not in out:
            raise GnnstError("MclSTExp.loss: batch.y (expression) is missing; the loss needs training spots")
        mask = centre_rows(batch)
        zi, zg = (out["z_img"], out["z_gene"]) if mask is None else (out["z_img"][mask], out["z_gene"][mask])
        loss = clip_loss(zi, zg, self.logit_scale)
        return {"contrastive": loss, "total": loss}

    # ------------------------------------------------------------------ retrieval
    def after_fit(self, train_graphs: Sequence[Data], *, batch_nodes: int) -> None:
        """The bank: every training spot, or a sample of ``model.retrieval_bank_spots`` of them
        (:func:`gnnst.models.retrieval.bank_nodes`), encoded within its spatial tile of ``batch_nodes`` spots
        (the sentences it was trained on, without halo)."""
        from gnnst.graph.sampler import SubgraphLoader

        masks = bank_centre_masks(train_graphs, self.cfg.retrieval_bank_spots)
        self.build_retrieval_bank(SubgraphLoader(train_graphs, batch_nodes=batch_nodes, num_hops=0, centre_masks=masks))

    @torch.no_grad()
    def build_retrieval_bank(self, batches: Iterable[Data]) -> None:
        """Encode the training spots (batches with ``y`` and ``pos``, e.g. a ``SubgraphLoader`` over
        the training graphs) in eval mode and keep ``(z_gene, y)`` of their centre spots as the bank."""
        if isinstance(batches, Tensor):
            raise GnnstError("MclSTExp.build_retrieval_bank: needs batches with y and pos (positions), not a tensor")
        was_training = self.training
        self.eval()
        zs, ys = [], []
        try:
            for b in batches:
                b = b.to(self.bank_z.device)
                out = self(b)
                if "z_gene" not in out:
                    raise GnnstError("build_retrieval_bank: a batch has no y (expression)")
                mask = centre_rows(b)
                zs.append(out["z_gene"] if mask is None else out["z_gene"][mask])
                ys.append((b.y if mask is None else b.y[mask]).to(self.bank_y))
        finally:
            self.train(was_training)
        if not zs:
            raise GnnstError("build_retrieval_bank: no training spots given")
        self.bank_z, self.bank_y = torch.cat(zs), torch.cat(ys)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"in_dim={self.in_dim}, num_genes={self.num_genes}, hidden={c.hidden}, layers={c.num_layers}, "
                f"proj_dim={c.proj_dim}, retrieval_k={c.retrieval_k}, bank={self.bank_z.size(0)}")


@register_model("mclstexp")
def _mclstexp(*, in_dim: int, num_genes: int, cfg: ModelConfig) -> MclSTExp:
    """mclSTExp-style comparison model: spots as a sentence on the expression side, retrieval with 1/d weights."""
    return MclSTExp(in_dim, num_genes, cfg)
