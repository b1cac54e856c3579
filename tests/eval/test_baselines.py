"""Baselines: the neighbour mean on hand-placed edges, and ridge + neighbour mean on tiny graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from gnnst.eval.baselines import fit_baseline, neighbour_mean


def test_neighbour_mean_hand_placed():
    x = np.array([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [7.0, 7.0]], dtype=np.float32)
    # row 0 neighbour (source), row 1 centre (target): 0 <- 1, 0 <- 2, 1 <- 0, 2 <- 1; spot 3 has none
    ei = np.array([[1, 2, 0, 1], [0, 0, 1, 2]])
    np.testing.assert_allclose(neighbour_mean(x, ei), [[4.0, 1.0], [1.0, 0.0], [3.0, 0.0], [7.0, 7.0]])


def _slide(seed: int, n: int = 64):
    """Spots on a jittered grid; y depends ONLY on the neighbours' embeddings (not the spot's own)."""
    from gnnst.graph.edges import graph_from_pos

    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n))
    pos = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 100.0
    pos = pos + rng.normal(0, 5, pos.shape)
    g = graph_from_pos(pos, k=4, radius_um=None)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    w = np.random.default_rng(99).normal(size=(6, 3)).astype(np.float32)
    y = neighbour_mean(x, g.edge_index) @ w
    return Data(x=torch.from_numpy(x), y=torch.from_numpy(y), pos=torch.from_numpy(pos).float(),
                edge_index=torch.from_numpy(g.edge_index), edge_attr=torch.from_numpy(g.edge_attr), num_nodes=n)


def test_ridge_neighbours_sees_what_ridge_cannot():
    from gnnst.graph.features import FeatureState
    from gnnst.metrics import pearson_per_gene
    from gnnst.train.prepare import TrainingSet

    graphs = {"A": _slide(0), "B": _slide(1), "T": _slide(2)}
    ts = TrainingSet(panel=None, graphs=graphs, train_slides=["A", "B"], test_slides=["T"], train=[], val=[],
                     val_masks=[], scaler=None, feature_norm=FeatureState(), inputs=graphs)
    y = graphs["T"].y.numpy()
    plain = fit_baseline("ridge", ts, ["T"], seed=0)["T"]
    nb = fit_baseline("ridge_neighbours", ts, ["T"], seed=0)["T"]
    assert plain.shape == nb.shape == y.shape
    assert np.nanmean(pearson_per_gene(y, nb)) > 0.95  # the neighbour mean is in its features
    assert np.nanmean(pearson_per_gene(y, plain)) < 0.5  # the spot's own embedding says little
    mean = fit_baseline("mean", ts, ["T"], seed=0)["T"]
    want = np.concatenate([graphs["A"].y.numpy(), graphs["B"].y.numpy()]).mean(0)
    np.testing.assert_allclose(mean, np.tile(want, (64, 1)), atol=1e-6)
    with pytest.raises(Exception, match="unknown baseline"):
        fit_baseline("lasso", ts, ["T"], seed=0)
