"""Training-only stain augmentation: one view per spot per epoch (gnnst.train.views)."""

from __future__ import annotations

import torch
from torch_geometric.data import Data

from gnnst import keys
from gnnst.train.views import epoch_features, set_views


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
    g, plain = _graph(), Data(x=torch.ones(5, 3), num_nodes=5)
    set_views([g, plain], 0, seed=1)
    assert g.x[:, 0].max() > 0 and torch.equal(plain.x, torch.ones(5, 3))
    set_views([g, plain], None, seed=1)
    assert torch.equal(g.x, getattr(g, keys.DATA_X_VIEWS)[0])
