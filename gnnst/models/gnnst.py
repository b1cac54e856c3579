"""GNNST: spot + neighbourhood image features, contrastively aligned with expression.

Architecture (every component switchable from :class:`~gnnst.config.ModelConfig`)::

    image side (x; all that exists at inference)
      h_img    = img_encoder(dropout(x))                      [N, H]   query branch
      n_img    = img_neighbour(h_img, edges)                  [N, H]   use_graph
      f_img    = fuse([h_img, n_img])  (h_img without graph)  [N, H]   forward_features
      y_hat    = head(f_img)                                  [N, G]
      z_img    = norm(proj_img(f_img))                        [N, P]   use_contrastive
      z_img_nb = norm(proj_img_nb(n_img))                     [N, P]   + use_neighbourhood_scale
    expression side (y; training spots only)
      h_gene    = gene_encoder(y)                             [N, H]
      z_gene    = norm(proj_gene(h_gene))                     [N, P]   use_contrastive
      z_gene_nb = norm(proj_gene_nb(gene_neighbour(h_gene)))  [N, P]   + use_neighbourhood_scale
      y_rec     = recon_decoder([gene_encoder(y masked), f_img])  [N, G]   use_masked_recon

Prediction (:meth:`GNNST.predict`) uses the head, retrieval of training spots (BLEEP /
mclSTExp: ``z_img`` of the query against a bank of ``z_gene`` of training spots) or a blend.
It implements :class:`~gnnst.models.base.ExpressionModel` (``prediction_modes`` = ``("head",
"retrieval")``, or ``("head",)`` without the contrastive branch).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data

from gnnst.config import PREDICT_MODES, ModelConfig
from gnnst.errors import GnnstError
from gnnst.models.base import ExpressionModel, blend
from gnnst.models.layers import MLP, ProjectionHead
from gnnst.models.losses import LOGIT_SCALE_MAX, compute_losses
from gnnst.models.neighbour import NeighborBranch
from gnnst.models.registry import register_model
from gnnst.models.retrieval import RetrievalBankMixin, bank_expression, retrieve_topk

EDGE_DIM = 3  # edge_attr columns: (dx, dy, distance) in micrometres, source minus target


class GNNST(RetrievalBankMixin, ExpressionModel):
    r"""Predict spot expression from the spot's patch embedding and its neighbourhood.

    Build with :func:`~gnnst.models.registry.create_model` (``"gnnst"``, or ``"gnnst_mlp"`` for
    the same model without the graph).

    Args:
        in_dim: Width ``D`` of the patch embeddings ``x`` (from the data).
        num_genes: Number of genes ``G`` (from the data).
        cfg: Hyper-parameters and component switches; defaults when ``None``.

    Modules that a switched-off component would use are not created, so every parameter of a
    built model receives a gradient from :func:`~gnnst.models.losses.compute_losses`:
    ``use_graph=False`` drops both neighbour branches, ``fuse`` and the neighbourhood
    projections; ``use_contrastive=False`` drops the projections, ``logit_scale`` and the
    retrieval bank (and the gene encoder unless ``use_masked_recon``);
    ``use_neighbourhood_scale=False`` drops ``gene_neighbour`` and the neighbourhood projections.

    Shapes:
        - **input:** a PyG ``Data``/``Batch`` with x ``[N, D]``, edge_index ``[2, E]``,
          edge_attr ``[E, 3]`` (µm), optionally y ``[N, G]`` and center_mask ``[N]``
        - **output:** see :meth:`forward`
    """

    def __init__(self, in_dim: int, num_genes: int, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = ModelConfig() if cfg is None else cfg
        self.cfg, self.in_dim, self.num_genes = cfg, in_dim, num_genes
        H, P = cfg.hidden, cfg.proj_dim
        graph = cfg.use_graph
        nbhd = graph and cfg.use_contrastive and cfg.use_neighbourhood_scale

        # image side (the only input at inference)
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.img_encoder = ProjectionHead(in_dim, H, cfg.dropout)
        self.img_neighbour = self._neighbour_branch() if graph else None
        self.fuse = ProjectionHead(2 * H, H, cfg.dropout) if graph else None
        self.head = MLP(H, H, num_genes, cfg.dropout)

        # expression side (needs y: training spots only)
        needs_gene = cfg.use_contrastive or cfg.use_masked_recon
        self.gene_encoder = ProjectionHead(num_genes, H, cfg.dropout) if needs_gene else None
        self.gene_neighbour = self._neighbour_branch() if nbhd else None

        # shared contrastive space
        proj = lambda: ProjectionHead(H, P, cfg.dropout)  # noqa: E731
        self.proj_img = proj() if cfg.use_contrastive else None
        self.proj_gene = proj() if cfg.use_contrastive else None
        self.proj_img_nb = proj() if nbhd else None
        self.proj_gene_nb = proj() if nbhd else None
        if cfg.use_contrastive:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            # retrieval bank: z_gene [M, P] and y [M, G] of training spots; M = 0 means "not set"
            self.register_buffer("bank_z", torch.zeros(0, P))
            self.register_buffer("bank_y", torch.zeros(0, num_genes))
        else:
            self.logit_scale = None

        # cross-modal masked reconstruction
        if cfg.use_masked_recon:
            self.mask_token = nn.Parameter(torch.zeros(num_genes))  # value fed for a hidden gene
            self.recon_decoder = MLP(2 * H, H, num_genes, cfg.dropout)
        else:
            self.mask_token, self.recon_decoder = None, None

    def _neighbour_branch(self) -> NeighborBranch:
        c = self.cfg
        return NeighborBranch(c.hidden, c.heads, c.num_layers, edge_dim=EDGE_DIM, dropout=c.dropout)

    def reset_parameters(self) -> None:
        for m in self.children():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        with torch.no_grad():
            if self.logit_scale is not None:
                self.logit_scale.fill_(math.log(1 / 0.07))
            if self.mask_token is not None:
                self.mask_token.zero_()

    # ------------------------------------------------------------------ inputs
    def _check_x(self, batch: Data) -> Tensor:
        x = batch.x
        if x is None or x.dim() != 2 or x.size(1) != self.in_dim:
            got = None if x is None else list(x.shape)
            raise GnnstError(f"batch.x: expected shape [N, {self.in_dim}] (model in_dim), got {got}")
        return x

    def _check_y(self, batch: Data) -> Tensor | None:
        y = batch.y
        if y is not None and (y.dim() != 2 or y.shape != (batch.x.size(0), self.num_genes)):
            raise GnnstError(
                f"batch.y: expected shape [{batch.x.size(0)}, {self.num_genes}] (N, model num_genes), "
                f"got {list(y.shape)}"
            )
        return y

    def _edges(self, batch: Data, like: Tensor) -> tuple[Tensor, Tensor]:
        """``edge_index [2, E]`` and dimensionless edge features ``[E, 3]`` (scaled, augmented)."""
        ei, ea = batch.edge_index, batch.edge_attr
        if ei is None:
            ei = torch.zeros(2, 0, dtype=torch.long, device=like.device)
        if ei.dim() != 2 or ei.size(0) != 2:
            raise GnnstError(f"batch.edge_index: expected shape [2, E], got {list(ei.shape)}")
        E = ei.size(1)
        if ea is None and E == 0:
            ea = like.new_zeros(0, EDGE_DIM)
        if ea is None or ea.dim() != 2 or ea.shape != (E, EDGE_DIM):
            got = None if ea is None else list(ea.shape)
            raise GnnstError(f"batch.edge_attr: expected shape [{E}, {EDGE_DIM}] (dx, dy, distance in µm), got {got}")
        e = ea.to(like.dtype) / self.cfg.edge_scale_um  # [E, 3]
        if self.training and self.cfg.edge_augment and E > 0:
            theta = float(torch.rand(()) * 2 * math.pi)
            c, s = math.cos(theta), math.sin(theta)
            flip = -1.0 if bool(torch.rand(()) < 0.5) else 1.0
            rot = torch.tensor([[c, -s * flip], [s, c * flip]], dtype=e.dtype)  # rotation after optional reflection
            rot = rot.to(e.device, non_blocking=True)  # no wait for the device's queue (new_tensor would)
            e = torch.cat([e[:, :2] @ rot.T, e[:, 2:]], dim=1)
        return ei, e

    # ------------------------------------------------------------------ image side
    def _image_side(self, batch: Data, edges: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor | None, Tensor]:
        x = self._check_x(batch)
        h_img = self.img_encoder(self.input_drop(x))  # [N, H]
        if self.img_neighbour is None:
            return h_img, None, h_img
        ei, e = edges if edges is not None else self._edges(batch, h_img)
        n_img = self.img_neighbour(h_img, ei, e)  # [N, H]
        f_img = self.fuse(torch.cat([h_img, n_img], dim=-1))  # [N, 2H] -> [N, H]
        return h_img, n_img, f_img

    def forward_features(self, batch: Data) -> Tensor:
        """Image-side features: the spot fused with its neighbourhood, ``[N, hidden]``."""
        return self._image_side(batch, None)[2]

    def forward_head(self, features: Tensor) -> Tensor:
        """Regression head: ``[N, hidden]`` -> ``y_hat [N, G]``."""
        return self.head(features)

    def forward(self, batch: Data) -> dict[str, Tensor]:
        """Run every switched-on branch; the loss is computed by ``compute_losses``.

        Returns a dict with (L2-normalised ``z_*``, ``P = proj_dim``):

        - ``y_hat [N, G]``: regression head (always),
        - ``z_img [N, P]``: spot scale, image side (``use_contrastive``),
        - ``z_img_nb [N, P]``: neighbourhood scale, image side (``use_graph``, ``use_contrastive``,
          ``use_neighbourhood_scale``),
        - ``z_gene [N, P]``, ``z_gene_nb [N, P]``: their expression-side partners (as above, and
          only when ``batch.y`` is present),
        - ``y_rec [N, G]``, ``recon_mask [N, G]`` bool: reconstruction of y from the image and
          the unmasked genes, and which genes were hidden (``use_masked_recon`` and ``batch.y``).

        Outputs cover all N nodes (halo included); losses select ``center_mask``.
        """
        cfg = self.cfg
        edges = None
        if self.img_neighbour is not None:
            edges = self._edges(batch, self._check_x(batch))
        _, n_img, f_img = self._image_side(batch, edges)
        out = {"y_hat": self.forward_head(f_img)}  # [N, G]
        if self.proj_img is not None:
            out["z_img"] = F.normalize(self.proj_img(f_img), dim=-1)  # [N, P]
        if self.proj_img_nb is not None:
            out["z_img_nb"] = F.normalize(self.proj_img_nb(n_img), dim=-1)  # [N, P]

        y = self._check_y(batch)
        if y is None or self.gene_encoder is None:
            return out
        y = y.to(f_img.dtype)
        if self.proj_gene is not None:
            h_gene = self.gene_encoder(y)  # [N, H]
            out["z_gene"] = F.normalize(self.proj_gene(h_gene), dim=-1)  # [N, P]
            if self.gene_neighbour is not None:
                n_gene = self.gene_neighbour(h_gene, *edges)  # [N, H]
                out["z_gene_nb"] = F.normalize(self.proj_gene_nb(n_gene), dim=-1)  # [N, P]
        if self.recon_decoder is not None:
            mask = torch.rand_like(y) < cfg.mask_ratio  # [N, G], True = hidden
            y_in = torch.where(mask, self.mask_token.expand_as(y), y)
            h_masked = self.gene_encoder(y_in)  # [N, H]
            out["y_rec"] = self.recon_decoder(torch.cat([h_masked, f_img], dim=-1))  # [N, G]
            out["recon_mask"] = mask
        return out

    # ------------------------------------------------------------------ retrieval
    def _need_contrastive(self, what: str) -> None:
        if self.proj_gene is None:
            raise GnnstError(f"{what} needs the contrastive branch, but model.use_contrastive is false")

    def encode_genes(self, y: Tensor | Data) -> Tensor:
        """Expression-side spot embeddings ``z_gene [M, P]`` (L2-normalised) of ``y [M, G]``.

        Spot scale only, so no graph is needed: pass the expression of all training spots (or a
        ``Data`` with ``y``). Call in eval mode (dropout off) when filling the retrieval bank.
        """
        self._need_contrastive("encode_genes")
        if isinstance(y, Data):
            y = self._check_y(y)
        if y is None or y.dim() != 2 or y.size(1) != self.num_genes:
            got = None if y is None else list(y.shape)
            raise GnnstError(f"encode_genes: expected y of shape [M, {self.num_genes}], got {got}")
        return F.normalize(self.proj_gene(self.gene_encoder(y.to(self.bank_z.dtype))), dim=-1)

    def set_retrieval_bank(self, z_gene_bank: Tensor, y_bank: Tensor) -> None:
        """Store gene-side embeddings ``[M, P]`` and expression ``[M, G]`` of training spots.

        Kept as buffers, so they are saved in (and restored from) the ``state_dict``.
        """
        self._need_contrastive("set_retrieval_bank")
        P, G = self.cfg.proj_dim, self.num_genes
        if z_gene_bank.dim() != 2 or z_gene_bank.size(1) != P or z_gene_bank.size(0) == 0:
            raise GnnstError(
                f"set_retrieval_bank: z_gene_bank must be [M, {P}] with M >= 1, got {list(z_gene_bank.shape)}"
            )
        if y_bank.shape != (z_gene_bank.size(0), G):
            raise GnnstError(
                f"set_retrieval_bank: y_bank must be [{z_gene_bank.size(0)}, {G}], got {list(y_bank.shape)}"
            )
        like = self.bank_z
        self.bank_z = F.normalize(z_gene_bank.detach().to(like), dim=-1)
        self.bank_y = y_bank.detach().to(like).clone()

    @torch.no_grad()
    def build_retrieval_bank(self, y_train: Tensor, *, batch_size: int = 4096) -> None:
        """Encode ``y_train [M, G]`` (all training spots) in eval mode and store it as the bank."""
        self._need_contrastive("build_retrieval_bank")
        was_training = self.training
        self.eval()
        try:
            y_train = y_train.to(self.bank_z)
            z = torch.cat([self.encode_genes(chunk) for chunk in y_train.split(batch_size)])  # [M, P]
        finally:
            self.train(was_training)
        self.set_retrieval_bank(z, y_train)

    @property
    def has_retrieval_bank(self) -> bool:
        return self.proj_gene is not None and self.bank_z.size(0) > 0

    def clear_retrieval_bank(self) -> None:
        self._need_contrastive("clear_retrieval_bank")
        self.bank_z = self.bank_z.new_zeros(0, self.cfg.proj_dim)
        self.bank_y = self.bank_y.new_zeros(0, self.num_genes)

    def _check_bank(self) -> None:
        if not self.has_retrieval_bank:
            raise GnnstError(
                "no retrieval bank: call model.build_retrieval_bank(y_train) (or set_retrieval_bank) "
                "after training, or predict with mode='head'"
            )

    @torch.no_grad()
    def retrieve(self, z_img: Tensor, k: int | None = None) -> Tensor:
        """Softmax-weighted mean expression of the ``k`` most similar bank spots, ``[N, G]``.

        Weights are ``softmax(cos(z_img, z_bank) * exp(logit_scale))`` over the top ``k``
        (``k = cfg.retrieval_k``, at most the bank size); ``k = 1`` returns the nearest spot's y.
        """
        self._check_bank()
        scale = self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)
        z_img = F.normalize(z_img.to(self.bank_z), dim=-1)
        return retrieve_topk(z_img, self.bank_z, self.bank_y, self.cfg.retrieval_k if k is None else k,
                             "softmax", scale)

    @torch.no_grad()
    def predict(self, batch: Data, *, mode: str | None = None) -> Tensor:
        """Predicted expression ``[N, G]`` of every node; ``batch.y`` is not used.

        ``mode`` (default ``cfg.predict_mode``): ``"head"``; ``"retrieval"`` (:meth:`retrieve`
        on ``z_img``); ``"blend"`` = ``blend_alpha * head + (1 - blend_alpha) * retrieval``.
        Retrieval and blend need a bank (:meth:`build_retrieval_bank`); without one they raise a
        :class:`GnnstError` rather than silently falling back. A model built with
        ``use_contrastive=False`` has no shared space: the configured mode then falls back to
        the head, while an explicit ``mode="retrieval"``/``"blend"`` raises.
        Does not switch train/eval: call ``model.eval()`` first.
        """
        if mode is None:
            mode = self.cfg.predict_mode if self.proj_img is not None else "head"
        if mode not in PREDICT_MODES:
            raise GnnstError(f"predict: mode must be one of {', '.join(PREDICT_MODES)}, got {mode!r}")
        if mode != "head":
            self._need_contrastive(f"predict(mode={mode!r})")
            self._check_bank()
        f_img = self.forward_features(batch)  # [N, H]
        if mode == "head":
            return self.forward_head(f_img)
        y_ret = self.retrieve(self.proj_img(f_img))  # [N, G]
        if mode == "retrieval":
            return y_ret
        return blend(self.forward_head(f_img), y_ret, self.cfg.blend_alpha)

    # ------------------------------------------------------------------ the model interface
    @property
    def prediction_modes(self) -> tuple[str, ...]:
        """``("head", "retrieval")``; ``("head",)`` without the contrastive branch."""
        return ("head", "retrieval") if self.proj_img is not None else ("head",)

    def loss(self, out: dict[str, Tensor], batch: Data) -> dict[str, Tensor]:
        """The weighted loss terms of :func:`~gnnst.models.losses.compute_losses` and their ``'total'``."""
        return compute_losses(self, out, batch)

    def after_fit(self, train_graphs, *, batch_nodes: int) -> None:
        """Fill the retrieval bank (contrastive models only) with every training spot, or a sample of
        ``model.retrieval_bank_spots`` of them (:func:`gnnst.models.retrieval.bank_nodes`)."""
        if self.proj_gene is not None:
            y = bank_expression(train_graphs, self.cfg.retrieval_bank_spots)
            self.build_retrieval_bank(y.to(self.bank_z.device))

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"in_dim={self.in_dim}, num_genes={self.num_genes}, use_graph={c.use_graph}, "
            f"use_contrastive={c.use_contrastive}, use_neighbourhood_scale={c.use_neighbourhood_scale}, "
            f"use_masked_recon={c.use_masked_recon}, predict_mode={c.predict_mode!r}, "
            f"bank={self.bank_z.size(0) if self.proj_gene is not None else 0}"
        )


@register_model("gnnst")
def _gnnst(*, in_dim: int, num_genes: int, cfg: ModelConfig) -> GNNST:
    """The default model: spot + neighbourhood image branches, two-scale contrastive alignment."""
    return GNNST(in_dim, num_genes, cfg)


@register_model("gnnst_mlp")
def _gnnst_mlp(*, in_dim: int, num_genes: int, cfg: ModelConfig) -> GNNST:
    """The same model without the graph (``use_graph`` forced off): a spot-only baseline."""
    return GNNST(in_dim, num_genes, dataclasses.replace(cfg, use_graph=False))


@register_model("gnnst_no_contrastive")
def _gnnst_no_contrastive(*, in_dim: int, num_genes: int, cfg: ModelConfig) -> GNNST:
    """Ablation: no gene branch and no InfoNCE losses (``use_contrastive`` forced off); head only."""
    return GNNST(in_dim, num_genes, dataclasses.replace(cfg, use_contrastive=False))


@register_model("gnnst_no_nbhd_scale")
def _gnnst_no_nbhd_scale(*, in_dim: int, num_genes: int, cfg: ModelConfig) -> GNNST:
    """Ablation: spot-scale contrastive loss only (``use_neighbourhood_scale`` forced off)."""
    return GNNST(in_dim, num_genes, dataclasses.replace(cfg, use_neighbourhood_scale=False))


@register_model("gnnst_masked_recon")
def _gnnst_masked_recon(*, in_dim: int, num_genes: int, cfg: ModelConfig) -> GNNST:
    """GNNST plus the cross-modal masked expression reconstruction (CMRCNet-style, ``use_masked_recon`` on)."""
    return GNNST(in_dim, num_genes, dataclasses.replace(cfg, use_masked_recon=True))
