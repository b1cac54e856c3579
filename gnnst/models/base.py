"""The one interface every gnnst model implements, so one training loop (:func:`gnnst.train.trainer.fit`)
and one predictor (:class:`gnnst.predictor.TrainedModel`) serve them all.

A model is an ``nn.Module`` built by a registered entry point ``fn(*, in_dim, num_genes, cfg)``
(:mod:`gnnst.models.registry`) and offers:

- ``forward(batch) -> dict`` of tensors (its own outputs, e.g. ``y_hat``, ``z_img``, ``z_gene``);
- ``loss(out, batch) -> dict`` of loss terms with ``'total'`` (the one that is back-propagated); only
  ``batch.center_mask`` nodes count when it is present (halo nodes carry messages, not loss);
- ``predict(batch, *, mode=None) -> [N, G]`` expression in the units of ``batch.y`` (standardised
  during training), from the image side alone; ``mode`` is one of :attr:`prediction_modes` (or
  ``"blend"`` where both ``"head"`` and ``"retrieval"`` exist), ``None`` = the model's default;
- ``prediction_modes``: the primitive modes, e.g. ``("head", "retrieval")`` for GNNST, ``("retrieval",)``
  for BLEEP/mclSTExp; the predictor blends ``head`` and ``retrieval`` with :func:`blend`;
- ``after_fit(train_graphs, *, batch_nodes)``: run by ``fit`` before each validation pass and after
  training (a retrieval model builds its bank of training spots here);
- ``uses_halo``: whether mini-batches need the ``train.num_hops`` halo of graph neighbours (``False``:
  each batch is a spatial tile alone; the retrieval models read no graph).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from gnnst.config import ModelConfig

PREDICTIONS = ("head", "retrieval")  # primitive prediction modes a model may offer; "blend" mixes them
T = TypeVar("T")


def blend(head: T, retrieval: T, alpha: float) -> T:
    """``alpha * head + (1 - alpha) * retrieval``: the one head/retrieval blend (arrays or tensors)."""
    return alpha * head + (1 - alpha) * retrieval


class ExpressionModel(nn.Module):
    """Base class of gnnst models (see the module docstring). Subclasses set ``cfg``, ``in_dim`` and
    ``num_genes`` and implement :meth:`forward`, :meth:`loss` and :meth:`predict`."""

    cfg: "ModelConfig"
    in_dim: int
    num_genes: int
    uses_halo: bool = True

    @property
    def prediction_modes(self) -> tuple[str, ...]:
        """The primitive prediction modes of this model (a subset of :data:`PREDICTIONS`)."""
        return ("head",)

    def loss(self, out: dict[str, Tensor], batch: Data) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, batch: Data, *, mode: str | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_fit(self, train_graphs: Sequence[Data], *, batch_nodes: int) -> None:
        """Prepare prediction from the training graphs (standardised ``y``); nothing by default."""


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
