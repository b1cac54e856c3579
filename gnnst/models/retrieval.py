"""Prediction by retrieval: the measured expression of the training spots whose expression embedding
is most similar to a query spot's image embedding. One top-k function for every model; the models
differ only in how the ``k`` retrieved profiles are weighted."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from gnnst.errors import GnnstError
from gnnst.models.base import ExpressionModel, check_xy

RETRIEVAL_CHUNK = 512  # query rows per similarity block
RETRIEVAL_WEIGHTS = ("softmax", "mean", "inverse_distance")  # how the top-k retrieved profiles are averaged
BANK_SEED = 0  # seed of the bank's sample of training spots (model.retrieval_bank_spots): the same at every call


def bank_centre_masks(train_graphs: Sequence[Data], limit: int | None) -> list[np.ndarray] | None:
    """Which training spots a retrieval bank of at most ``limit`` spots holds (``model.retrieval_bank_spots``),
    as ``[N]`` bool masks per graph (a sampler's ``centre_masks``).

    ``None`` when it holds every present spot (:func:`gnnst.graph.sampler.node_mask`) of ``train_graphs``:
    there are at most ``limit`` of them, or ``limit`` is ``None``. Otherwise a uniform sample of ``limit`` of
    the present spots of all graphs, seeded with :data:`BANK_SEED`: the same spots at every epoch's bank and
    in the final one, whatever the model's seed. Costs O(spots) booleans, never their expression.
    """
    from gnnst.graph.sampler import node_mask
    from gnnst.sampling import sample_masks

    present = [node_mask(g) for g in train_graphs]
    return sample_masks([np.ones(g.num_nodes, dtype=bool) if m is None else m for g, m in zip(train_graphs, present)],
                        limit, BANK_SEED)


def bank_nodes(train_graphs: Sequence[Data], limit: int | None) -> list[np.ndarray] | None:
    """:func:`bank_centre_masks` as node ids ``[M_i]`` (ascending) per graph; ``None`` = every present spot."""
    masks = bank_centre_masks(train_graphs, limit)
    return None if masks is None else [np.flatnonzero(m) for m in masks]


def bank_expression(train_graphs: Sequence[Data], limit: int | None) -> Tensor:
    """``y`` ``[M, G]`` of the spots :func:`bank_nodes` puts in the bank, graph by graph in node order (only
    those rows are read: a file-backed ``y`` is not paged in whole)."""
    from gnnst.graph.sampler import present_rows

    ids = bank_nodes(train_graphs, limit)
    if ids is None:
        return torch.cat([present_rows(g, g.y) for g in train_graphs])
    return torch.cat([g.y[torch.from_numpy(i)] for g, i in zip(train_graphs, ids)])


def retrieve_topk(query: Tensor, bank_z: Tensor, bank_y: Tensor, k: int, weights: str = "mean",
                  scale: Tensor | float | None = None) -> Tensor:
    r"""Weighted mean of the measured expression of the ``k`` bank spots most similar to each query.

    Similarity is the dot product (cosine for L2-normalised embeddings). Weights over the top ``k``:
    ``"softmax"`` = ``softmax(similarity * scale)`` (GNNST, ``scale`` = its temperature),
    ``"mean"`` = equal (BLEEP), ``"inverse_distance"`` = ``1 / ||query - bank||`` normalised (mclSTExp).
    ``k`` is capped at the bank size.

    Shapes:
        - **input:** query ``[N, P]``, bank_z ``[M, P]``, bank_y ``[M, G]``
        - **output:** ``[N, G]``
    """
    if weights not in RETRIEVAL_WEIGHTS:
        raise GnnstError(f"retrieve_topk: weights must be one of {', '.join(RETRIEVAL_WEIGHTS)}, got {weights!r}")
    if weights == "softmax" and scale is None:
        raise GnnstError("retrieve_topk: weights='softmax' needs a scale")
    if bank_z.size(0) == 0:
        raise GnnstError("no retrieval bank: call model.build_retrieval_bank(...) with the training spots first")
    k = min(k, bank_z.size(0))
    query = query.to(bank_z)
    outs = []
    for q in query.split(RETRIEVAL_CHUNK):
        sim = q @ bank_z.T  # [n, M]
        top, idx = sim.topk(k, dim=1)  # [n, k]
        if weights == "softmax":
            w = torch.softmax(top * scale, dim=1)
        elif weights == "mean":
            w = torch.full_like(top, 1.0 / k)
        else:
            d2 = (q * q).sum(1, keepdim=True) - 2 * top + (bank_z * bank_z).sum(1)[idx]  # [n, k] squared distances
            w = 1.0 / (d2.clamp_min(0).sqrt() + 1e-6)
            w = w / w.sum(1, keepdim=True)
        outs.append(torch.einsum("nk,nkg->ng", w, bank_y[idx]))  # [n, k, G] -> [n, G]
    return torch.cat(outs) if outs else query.new_zeros(0, bank_y.size(1))


class RetrievalBankMixin:
    """For models holding a retrieval bank in the buffers ``bank_z`` ``[M, P]`` (embedded training spots)
    and ``bank_y`` ``[M, G]`` (their expression); put it before ``nn.Module`` in the bases.

    A checkpoint restores the bank whatever its size ``M`` (known only from the checkpoint).
    """

    @property
    def has_retrieval_bank(self) -> bool:
        return self.bank_z.size(0) > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # resize the bank's buffers to the checkpoint's M before nn.Module copies into them
        for name in ("bank_z", "bank_y"):
            key = prefix + name
            if key in state_dict and self._buffers.get(name) is not None:
                self._buffers[name] = self._buffers[name].new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RetrievalOnlyModel(RetrievalBankMixin, ExpressionModel):
    """Base of models without a regression head: ``predict`` is top-k retrieval from the bank, weighted as
    the class attribute ``retrieval_weights`` says (see :func:`retrieve_topk`); batches carry no halo.
    Subclasses implement ``encode_image(x) -> [N, P]`` and ``build_retrieval_bank``."""

    retrieval_weights = "mean"
    uses_halo = False

    @property
    def prediction_modes(self) -> tuple[str, ...]:
        return ("retrieval",)

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

    def after_fit(self, train_graphs: Sequence[Data], *, batch_nodes: int) -> None:
        """The bank: the expression embedding and expression of every training spot, or of a sample of
        ``model.retrieval_bank_spots`` of them (:func:`bank_nodes`)."""
        self.build_retrieval_bank(bank_expression(train_graphs, self.cfg.retrieval_bank_spots))
