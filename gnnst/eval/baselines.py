"""Baselines fitted on the same folds, panels, normalisation and embeddings as the model
(``eval.baselines``), so that every run shows the bar the model has to clear:

- ``mean``: the mean expression of the training spots, for every spot (a constant: its per-slide
  PCC is undefined; its MSE is the reference for the error figures);
- ``ridge``: PCA to 256 then ridge (strength by generalised cross-validation on the training spots),
  on the spot's own embedding (HEST-Benchmark style);
- ``ridge_neighbours``: the same on ``[own embedding, mean embedding of its graph neighbours]`` (the
  graph of ``graph.k`` / ``graph.radius_um``); no learning on the graph, so the bar any graph model
  has to clear.

All are fitted on every spot of the training slides (validation blocks included) with their
normalised (unscaled) expression, and predict the held-out slides from their embeddings alone; the
embeddings are the model's input of the fold (``features``: stain-normalised patches, per-slide
standardisation), and with ``features.stain_augment`` each augmented view of a training spot is one
more training row. :func:`baseline_validation_score` is their inner validation score (fitted without
the validation blocks, scored on them), comparable with the model's ``val_pcc_ensemble``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from torch_geometric.data import Data

    from gnnst.train.prepare import TrainingSet

LABELS = {"mean": "mean of training spots", "ridge": "ridge", "ridge_neighbours": "ridge + neighbour mean"}


def ridge_fit(x_train: np.ndarray, y_train: np.ndarray, seed: int):
    """PCA to 256 then ridge (strength by GCV on the training spots), fitted on ``x_train`` ``[N, F]``,
    ``y_train`` ``[N, G]``; returns the predictor ``x [n, F] -> [n, G]`` float32."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_train)
    pca = PCA(n_components=min(256, x_train.shape[0] - 1, x_train.shape[1]), random_state=seed)
    z = pca.fit_transform(sc.transform(x_train))
    ridge = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(z, y_train)
    return lambda x: ridge.predict(pca.transform(sc.transform(x))).astype(np.float32)


def neighbour_mean(x: np.ndarray, edge_index: np.ndarray) -> np.ndarray:
    """Mean of the neighbours' rows of ``x`` for each spot (over its incoming edges, row 0 -> row 1); a
    spot without neighbours gets its own row.

    Shapes: x ``[N, D]``, edge_index ``[2, E]`` -> ``[N, D]``.
    """
    x = np.asarray(x, dtype=np.float32)
    src, dst = np.asarray(edge_index, dtype=np.int64)
    total = np.zeros_like(x)
    np.add.at(total, dst, x[src])
    count = np.bincount(dst, minlength=len(x)).astype(np.float32)[:, None]  # [N, 1]
    return np.where(count > 0, total / np.maximum(count, 1), x)


def neighbour_features(g: "Data", x=None) -> np.ndarray:
    """``[own embedding, mean embedding of its graph neighbours]`` of every spot, ``[N, 2D]`` (``x``: other
    node features ``[N, D]`` than ``g.x``, e.g. an augmented view)."""
    x = np.asarray(g.x if x is None else x, dtype=np.float32)
    return np.concatenate([x, neighbour_mean(x, g.edge_index.numpy())], axis=1)


def _features(name: str, g: "Data", *, views: bool) -> np.ndarray:
    """Baseline ``name``'s input rows of graph ``g``: one per spot, or with ``views`` one per spot and view of
    its ``x_views`` (training-only stain augmentation: each view is a training row), ``[V * N, F]``."""
    xs = getattr(g, keys.DATA_X_VIEWS, None) if views else None
    xs = [g.x] if xs is None else list(xs)
    if name == "ridge":
        return np.concatenate([np.asarray(x, dtype=np.float32) for x in xs])
    if name == "ridge_neighbours":
        return np.concatenate([neighbour_features(g, x) for x in xs])
    raise GnnstError(f"config key 'eval.baselines': unknown baseline {name!r} (known: {', '.join(LABELS)})")


def _trained_part(g: "Data", y: np.ndarray) -> tuple["Data", np.ndarray]:
    """``g`` and its targets ``y`` ``[N, G]`` as the model trains on them: the nodes of its ``node_mask`` (a
    training part, validation blocks removed) with the edges among them (:func:`node_subgraph`)."""
    from gnnst.graph.sampler import node_mask
    from gnnst.train.prepare import node_subgraph

    m = node_mask(g)
    return (g, y) if m is None else (node_subgraph(g, m), y[m])


def _fit_predict(name: str, train: Sequence["Data"], targets: Callable[["Data"], np.ndarray], test: dict, seed: int,
                 limit: int | None = None) -> dict:
    """Baseline ``name`` fitted on the ``train`` graphs' spots (those of their ``node_mask``: a training
    part's, with the edges among them; ``x`` the model's input, ``x_views`` as extra rows), with the targets
    ``targets(graph)`` (``[N_i, G]``, all its nodes), on at most ``limit`` rows (a seeded sample,
    :func:`gnnst.sampling.sample_parts`); each graph is read on its own, so only the kept rows of a cohort
    are held. ``test``: ``{key: (graph, mask)}``, ``mask`` ``[N]`` bool or ``None``; returns ``{key: [n, G]}``
    at the masked nodes (all nodes without a mask), each test graph's features made on their own."""
    from gnnst.graph.sampler import node_mask
    from gnnst.sampling import sample_parts

    views = [getattr(g, keys.DATA_X_VIEWS, None) for g in train]
    present = [node_mask(g) for g in train]
    sizes = [(1 if v is None else len(v)) * (g.num_nodes if m is None else int(m.sum()))
             for g, v, m in zip(train, views, present)]
    rows = sample_parts(sizes, limit, [seed, 2])
    xs, ys = [], []
    for i, (g, v) in enumerate(zip(train, views)):
        g, y = _trained_part(g, np.asarray(targets(g), dtype=np.float32))
        keep = slice(None) if rows is None else rows[i]
        ys.append(np.tile(y, (1 if v is None else len(v), 1))[keep])
        if name != "mean":
            xs.append(_features(name, g, views=True)[keep])
    y_tr = np.concatenate(ys)
    if name == "mean":
        mu = y_tr.mean(0, dtype=np.float64).astype(np.float32)
        return {s: np.tile(mu, (g.num_nodes if m is None else int(m.sum()), 1)) for s, (g, m) in test.items()}
    predict = ridge_fit(np.concatenate(xs), y_tr, seed)
    del xs
    out = {}
    for s, (g, m) in test.items():
        x = _features(name, g, views=False)
        out[s] = predict(x if m is None else x[m])
    return out


def fit_baseline(name: str, ts: "TrainingSet", test_slides: Sequence[str], seed: int,
                 limit: int | None = None) -> dict[str, np.ndarray]:
    """Baseline ``name`` fitted on the training slides of ``ts`` (every spot, validation blocks included; their
    model inputs, augmented views as extra rows; at most ``limit`` rows, ``eval.baseline_spots``);
    ``{slide: [N_s, G]}`` normalised expression predicted for ``test_slides`` from their model inputs (the
    fold's :class:`~gnnst.graph.features.FeatureState` applied, as for the model)."""
    train = ts.train_full
    return _fit_predict(name, train, lambda g: g.y.numpy(), {s: (ts.inputs[s], None) for s in test_slides}, seed,
                        limit)


def baseline_validation_score(name: str, ts: "TrainingSet", seed: int, limit: int | None = None) -> float | None:
    """The inner validation score of baseline ``name``: fitted on the training parts of ``ts`` (the spots of
    their ``node_mask``: validation blocks removed, as the model trains; at most ``limit`` rows), scored on the
    scored validation spots of the training slides (``ts.val_masks``) with the score that selects the model's
    epoch (:func:`gnnst.train.trainer.validation_score`); ``None`` for the constant ``mean`` or without
    validation spots. Uses the training slides only."""
    from gnnst.train.trainer import validation_score

    if name == "mean" or sum(int(m.sum()) for m in ts.val_masks) < 2:
        return None
    pred = _fit_predict(name, ts.train, lambda g: ts.scaler.inverse(g.y.numpy().astype(np.float32)),
                        {i: (g, m) for i, (g, m) in enumerate(zip(ts.val, ts.val_masks))}, seed, limit)
    return validation_score([g.y.numpy()[m] for g, m in zip(ts.val, ts.val_masks)],
                            [pred[i] for i in range(len(ts.val))])
