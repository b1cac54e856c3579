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

from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from torch_geometric.data import Data

    from gnnst.train.prepare import TrainingSet

LABELS = {"mean": "mean of training spots", "ridge": "ridge", "ridge_neighbours": "ridge + neighbour mean"}


def ridge_baseline(x_train: np.ndarray, y_train: np.ndarray, x_test: dict[str, np.ndarray], seed: int) -> dict:
    """PCA to 256 then ridge (strength by GCV on the training spots); predictions ``[N_s, G]`` per test slide.

    Shapes: x_train ``[N, F]``, y_train ``[N, G]``, x_test slide -> ``[N_s, F]``.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_train)
    pca = PCA(n_components=min(256, x_train.shape[0] - 1, x_train.shape[1]), random_state=seed)
    z = pca.fit_transform(sc.transform(x_train))
    ridge = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(z, y_train)
    return {s: ridge.predict(pca.transform(sc.transform(x))).astype(np.float32) for s, x in x_test.items()}


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


def _fit_predict(name: str, train: Sequence["Data"], y_train: Sequence[np.ndarray], test: dict, seed: int) -> dict:
    """Baseline ``name`` fitted on ``train`` graphs (``x`` the model's input, ``x_views`` used as extra
    rows) with targets ``y_train`` (``[N_i, G]`` each); ``{slide: [N_s, G]}`` for the ``test`` graphs."""
    views = [getattr(g, keys.DATA_X_VIEWS, None) for g in train]
    y_tr = np.concatenate([np.tile(np.asarray(y, dtype=np.float32), (1 if v is None else len(v), 1))
                           for y, v in zip(y_train, views)])
    if name == "mean":
        mu = y_tr.mean(0, dtype=np.float64).astype(np.float32)
        return {s: np.tile(mu, (g.num_nodes, 1)) for s, g in test.items()}
    x_tr = np.concatenate([_features(name, g, views=True) for g in train])
    return ridge_baseline(x_tr, y_tr, {s: _features(name, g, views=False) for s, g in test.items()}, seed)


def fit_baseline(name: str, ts: "TrainingSet", test_slides: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    """Baseline ``name`` fitted on the training slides of ``ts`` (their model inputs, augmented views as
    extra rows); ``{slide: [N_s, G]}`` normalised expression predicted for ``test_slides`` from their
    model inputs (the fold's :class:`~gnnst.graph.features.FeatureState` applied, as for the model)."""
    train = ts.train_full
    return _fit_predict(name, train, [g.y.numpy() for g in train], {s: ts.inputs[s] for s in test_slides}, seed)


def baseline_validation_score(name: str, ts: "TrainingSet", seed: int) -> float | None:
    """The inner validation score of baseline ``name``: fitted on the training parts of ``ts`` (validation
    blocks removed, as the model trains), scored on the validation blocks of the training slides with the
    score that selects the model's epoch (:func:`gnnst.train.trainer.validation_score`); ``None`` for the
    constant ``mean`` or without validation spots. Uses the training slides only."""
    from gnnst.train.trainer import validation_score

    if name == "mean" or sum(int(m.sum()) for m in ts.val_masks) < 2:
        return None
    y_train = [ts.scaler.inverse(g.y.numpy().astype(np.float32)) for g in ts.train]
    pred = _fit_predict(name, ts.train, y_train, {i: g for i, g in enumerate(ts.val)}, seed)
    return validation_score([g.y.numpy()[m] for g, m in zip(ts.val, ts.val_masks)],
                            [pred[i][m] for i, m in enumerate(ts.val_masks)])
