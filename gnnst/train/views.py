"""Training-only stain augmentation: each epoch a spot's input is one of its views.

A training graph with ``x_views`` ``[V, N, D]`` (view 0 = the unaugmented embeddings, views ``1..V-1``
of HED-jittered patches; :func:`gnnst.graph.features.fold_features`) gets, at the start of every epoch,
``x_pick`` ``[N]``: one view per spot drawn uniformly (:func:`epoch_pick`); the samplers read a spot's
input as ``x_views[x_pick[i], i]``, batch by batch (the host sampler) or slide by slide (the device
sampler), so an epoch's inputs are never materialised for a whole cohort at once. After the epoch's steps
``x_pick`` is gone and ``x`` is view 0, so validation, the retrieval bank (``after_fit``) and prediction
never see an augmented view.
The draw depends only on ``(seed, epoch, graph number)``, so a resumed run replays it. Graphs without
``x_views`` are left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from gnnst import keys

if TYPE_CHECKING:
    import torch
    from torch_geometric.data import Data


def epoch_pick(g: "Data", epoch: int, seed: int, index: int = 0) -> "torch.Tensor":
    """``[N]`` int64: for each spot of ``g``, which of its ``x_views`` ``[V, N, D]`` it takes, drawn from a
    generator seeded by ``(seed, epoch, index)`` (``index``: the graph's number among the training graphs)."""
    import torch

    views = getattr(g, keys.DATA_X_VIEWS)
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_009 + index) % (2**63 - 1))
    return torch.randint(views.shape[0], (views.shape[1],), generator=gen)


def set_views(graphs: Sequence["Data"], epoch: int | None, seed: int) -> None:
    """Give each graph the ``x_pick`` of ``epoch`` (:func:`epoch_pick`), or none and ``x`` = view 0 when
    ``epoch`` is ``None`` (in place; graphs without ``x_views`` are untouched). A spot's input is then
    :func:`gnnst.graph.sampler.input_rows`."""
    for i, g in enumerate(graphs):
        views = getattr(g, keys.DATA_X_VIEWS, None)
        if views is None:
            continue
        g.x = views[0]
        if epoch is None:
            if getattr(g, keys.DATA_X_PICK, None) is not None:
                del g[keys.DATA_X_PICK]
        else:
            setattr(g, keys.DATA_X_PICK, epoch_pick(g, epoch, seed, i))
