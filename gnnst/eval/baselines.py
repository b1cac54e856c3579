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
normalised (unscaled) expression, and predict the held-out slides from their embeddings alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

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


def neighbour_features(g: "Data") -> np.ndarray:
    """``[own embedding, mean embedding of its graph neighbours]`` of every spot, ``[N, 2D]``."""
    x = g.x.numpy().astype(np.float32)
    return np.concatenate([x, neighbour_mean(x, g.edge_index.numpy())], axis=1)


def fit_baseline(name: str, ts: "TrainingSet", test_slides: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    """Baseline ``name`` fitted on the training slides of ``ts``; ``{slide: [N_s, G]}`` normalised
    expression predicted for ``test_slides``."""
    train = ts.train_full
    y_tr = np.concatenate([g.y.numpy() for g in train]).astype(np.float32)
    test = {s: ts.graphs[s] for s in test_slides}
    if name == "mean":
        mu = y_tr.mean(0, dtype=np.float64).astype(np.float32)
        return {s: np.tile(mu, (g.num_nodes, 1)) for s, g in test.items()}
    if name == "ridge":
        feats = lambda g: g.x.numpy().astype(np.float32)  # noqa: E731
    elif name == "ridge_neighbours":
        feats = neighbour_features
    else:
        raise GnnstError(f"config key 'eval.baselines': unknown baseline {name!r} (known: {', '.join(LABELS)})")
    x_tr = np.concatenate([feats(g) for g in train])
    return ridge_baseline(x_tr, y_tr, {s: feats(g) for s, g in test.items()}, seed)
