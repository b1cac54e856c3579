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


def _fold(fraction: float = 0.3, cfg_over=()):
    """Two training slides whose validation blocks (carved as honest_targets carves them) hold y from the last
    three embedding dimensions, and whose other spots hold y from the first three: a fit on the training
    spots alone says nothing of the blocks' y; a fit that sees the blocks learns it."""
    from gnnst.config import load_config
    from gnnst.graph.features import FeatureState
    from gnnst.train.prepare import TrainingSet, carve_validation, honest_targets

    cfg = load_config(None, [f"train.val_fraction={fraction}", *cfg_over])
    graphs = {"A": _slide(0, n=144), "B": _slide(1, n=144)}
    blocks = carve_validation(list(graphs.values()), fraction, cfg.seed)
    wa, wb = np.random.default_rng(5).normal(size=(2, 3, 3)).astype(np.float32)
    for g, b in zip(graphs.values(), blocks):
        x = g.x.numpy()
        g.y = torch.from_numpy(np.where(b[:, None], x[:, 3:] @ wb, 0.2 * x[:, :3] @ wa))
    val_masks, scaler, train, val = honest_targets(list(graphs.values()), cfg)
    ts = TrainingSet(panel=None, graphs=graphs, train_slides=["A", "B"], test_slides=[], train=train, val=val,
                     val_masks=val_masks, scaler=scaler, feature_norm=FeatureState(), inputs=graphs)
    return ts, blocks


def test_baseline_inner_validation_never_fits_the_validation_blocks():
    from gnnst.eval.baselines import _fit_predict, baseline_validation_score
    from gnnst.train.trainer import validation_score

    ts, blocks = _fold()
    assert all(np.array_equal(m, b) for m, b in zip(ts.val_masks, blocks))
    honest = baseline_validation_score("ridge", ts, seed=0)
    # the same ridge fitted on every spot, blocks included: the signal in the blocks is learnt
    test = {i: (g, m) for i, (g, m) in enumerate(zip(ts.val, ts.val_masks))}
    seen = _fit_predict("ridge", ts.val, lambda g: g.y.numpy(), test, seed=0)
    leaky = validation_score([g.y.numpy()[m] for g, m in zip(ts.val, ts.val_masks)], [seen[0], seen[1]])
    assert leaky > 0.7 and abs(honest) < 0.2, (honest, leaky)


def test_baseline_spots_caps_the_training_rows():
    from gnnst.eval.baselines import _fit_predict, ridge_fit
    from gnnst.sampling import sample_parts

    assert sample_parts([5, 7], None, 0) is None and sample_parts([5, 7], 12, 0) is None
    rows = sample_parts([5, 7], 4, 0)
    assert sum(len(r) for r in rows) == 4 and rows[0].max(initial=0) < 5 and rows[1].max(initial=0) < 7
    graphs = [_slide(0), _slide(1)]
    test = {"T": (_slide(2), None)}
    sub = _fit_predict("ridge", graphs, lambda g: g.y.numpy(), test, seed=0, limit=40)["T"]
    rows = sample_parts([64, 64], 40, [0, 2])  # the baselines' seed: [eval seed, 2]
    x = np.concatenate([g.x.numpy()[r] for g, r in zip(graphs, rows)])
    y = np.concatenate([g.y.numpy()[r] for g, r in zip(graphs, rows)])
    np.testing.assert_array_equal(sub, ridge_fit(x, y, 0)(test["T"][0].x.numpy()))
    full = _fit_predict("ridge", graphs, lambda g: g.y.numpy(), test, seed=0, limit=128)["T"]
    np.testing.assert_array_equal(full, _fit_predict("ridge", graphs, lambda g: g.y.numpy(), test, seed=0)["T"])
    assert not np.array_equal(sub, full)
