"""Training-only stain augmentation: one view per spot per epoch (gnnst.train.views)."""

from __future__ import annotations

import torch
from torch_geometric.data import Data

from gnnst import keys
from gnnst.train.views import set_views
from gnnst_testdata import epoch_features


def _graph(n=200, d=3, v=4):
    views = torch.arange(v, dtype=torch.float32)[:, None, None].expand(v, n, d).clone()  # view i holds i
    g = Data(x=views[0].clone(), num_nodes=n)
    setattr(g, keys.DATA_X_VIEWS, views)
    return g


def test_one_view_per_spot_drawn_per_epoch_and_replayed():
    g = _graph()
    x = epoch_features(g, epoch=3, seed=0)
    assert x.shape == (200, 3) and torch.all(x[:, 0:1] == x)  # a spot takes all of one view's row
    assert set(x[:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}  # every view, the unaugmented one included
    assert torch.equal(x, epoch_features(g, epoch=3, seed=0))  # a resumed run replays the draw
    assert not torch.equal(x, epoch_features(g, epoch=4, seed=0))


def test_set_views_then_back_to_view_zero():
    """During an epoch a spot's input is its drawn view (input_rows), x itself stays view 0; after, no pick."""
    from gnnst.graph.sampler import input_rows

    g, plain = _graph(), Data(x=torch.ones(5, 3), num_nodes=5)
    set_views([g, plain], 0, seed=1)
    assert torch.equal(input_rows(g), epoch_features(g, 0, seed=1, index=0)) and input_rows(g)[:, 0].max() > 0
    rows = torch.tensor([7, 3, 150])
    assert torch.equal(input_rows(g, rows), epoch_features(g, 0, seed=1, index=0)[rows])
    assert torch.equal(g.x, getattr(g, keys.DATA_X_VIEWS)[0])  # nothing materialised for the epoch
    assert torch.equal(input_rows(plain), torch.ones(5, 3)) and getattr(plain, keys.DATA_X_PICK, None) is None
    set_views([g, plain], None, seed=1)
    assert getattr(g, keys.DATA_X_PICK, None) is None
    assert torch.equal(input_rows(g), getattr(g, keys.DATA_X_VIEWS)[0])


def test_batches_carry_the_epochs_views_as_the_materialised_inputs_did():
    """The host sampler's batches under an epoch's pick equal those of a copy whose x is that epoch's
    materialised features (what training saw before views were picked per batch)."""
    import copy

    import numpy as np

    from gnnst.graph.edges import edge_features, spatial_edges
    from gnnst.graph.sampler import SubgraphLoader

    g = _graph(n=150, d=5, v=3)
    views = getattr(g, keys.DATA_X_VIEWS)
    setattr(g, keys.DATA_X_VIEWS, views + torch.randn(views.shape))  # rows differ within a view too
    pos = np.random.default_rng(0).random((150, 2)) * 1000
    ei = spatial_edges(pos, k=6)
    g.pos, g.edge_index = torch.tensor(pos, dtype=torch.float32), torch.from_numpy(ei)
    g.edge_attr = torch.from_numpy(edge_features(pos, ei))
    set_views([g], 5, seed=2)
    old = copy.copy(g)
    del old[keys.DATA_X_PICK]
    old.x = epoch_features(g, 5, seed=2, index=0)
    kw = dict(batch_nodes=32, num_hops=2, shuffle=True, seed=4)
    n = 0
    for a, b in zip(SubgraphLoader([g], **kw), SubgraphLoader([old], **kw), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.node_id, b.node_id)
        n += 1
    assert n > 2
