"""Training-only stain augmentation: each epoch a spot's input is one of its views.

A training graph with ``x_views`` ``[V, N, D]`` (view 0 = the unaugmented embeddings, views ``1..V-1``
of HED-jittered patches; :func:`gnnst.graph.features.fold_features`) gets, at the start of every epoch,
``x`` = one view per spot drawn uniformly (:func:`epoch_features`); after the epoch's steps ``x`` is view 0
again, so validation, the retrieval bank (``after_fit``) and prediction never see an augmented view.
The draw depends only on ``(seed, epoch, graph number)``, so a resumed run replays it. Graphs without
``x_views`` are left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from gnnst import keys

if TYPE_CHECKING:
    import torch
    from torch_geometric.data import Data


def epoch_features(g: "Data", epoch: int, seed: int, index: int = 0) -> "torch.Tensor":
    """``[N, D]``: for each spot of ``g``, one of its ``x_views`` ``[V, N, D]``, drawn from a generator seeded
    by ``(seed, epoch, index)`` (``index``: the graph's number among the training graphs)."""
    import torch

    views = getattr(g, keys.DATA_X_VIEWS)
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_009 + index) % (2**63 - 1))
    pick = torch.randint(views.shape[0], (views.shape[1],), generator=gen)  # [N] view of each spot
    return views[pick, torch.arange(views.shape[1])]


def set_views(graphs: Sequence["Data"], epoch: int | None, seed: int) -> None:
    """Set each graph's ``x`` to :func:`epoch_features` of ``epoch``, or to view 0 when ``epoch`` is ``None``
    (in place; graphs without ``x_views`` are untouched)."""
    for i, g in enumerate(graphs):
        views = getattr(g, keys.DATA_X_VIEWS, None)
        if views is not None:
            g.x = views[0] if epoch is None else epoch_features(g, epoch, seed, i)
