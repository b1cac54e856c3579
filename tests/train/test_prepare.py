"""What a fit is given (gnnst.train.prepare): the scored validation spots (train.val_spots)."""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import Data

from gnnst.config import load_config
from gnnst.train.prepare import carve_validation, honest_targets, scored_validation


def _slide(n: int, seed: int) -> Data:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    pos = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 100.0
    ei = torch.stack([torch.arange(n), torch.arange(n).roll(1)])
    return Data(x=torch.randn(n, 4), y=torch.from_numpy(rng.random((n, 3)).astype(np.float32)),
                pos=torch.from_numpy(pos).float(), edge_index=ei, edge_attr=torch.zeros(n, 3), num_nodes=n)


def test_scored_validation_keeps_the_blocks_up_to_the_limit_then_samples_them():
    masks = [np.arange(40) % 4 == 0, np.zeros(10, dtype=bool), np.arange(30) < 20]  # 10 + 0 + 20 spots
    for limit in (None, 30, 31):
        assert all(np.array_equal(a, b) for a, b in zip(scored_validation(masks, limit, 0), masks))
    s = scored_validation(masks, 12, 0)
    assert sum(int(m.sum()) for m in s) == 12 and all((m <= b).all() for m, b in zip(s, masks))
    assert all(np.array_equal(a, b) for a, b in zip(s, scored_validation(masks, 12, 0)))  # seeded
    assert any(not np.array_equal(a, b) for a, b in zip(s, scored_validation(masks, 12, 1)))
    # a uniform sample of all the blocks' spots, so both slides with blocks are drawn from
    counts = np.array([[int(m.sum()) for m in scored_validation(masks, 12, seed)] for seed in range(200)]).mean(0)
    assert abs(counts[0] - 4) < 1 and counts[1] == 0 and abs(counts[2] - 8) < 1


def test_val_spots_bounds_the_scored_spots_not_the_blocks_left_out_of_training():
    slides = [_slide(64, 0), _slide(49, 1)]
    full = load_config(None, ["train.val_fraction=0.3", "train.val_spots=null"])
    few = load_config(None, ["train.val_fraction=0.3", "train.val_spots=7"])
    blocks = carve_validation(slides, 0.3, full.seed)
    m_all, scaler_all, train_all, _ = honest_targets(slides, full)
    m_few, scaler_few, train_few, val_few = honest_targets(slides, few)
    assert all(np.array_equal(a, b) for a, b in zip(m_all, blocks))
    assert sum(int(m.sum()) for m in m_few) == 7 and all((m <= b).all() for m, b in zip(m_few, blocks))
    for a, b, blk in zip(train_all, train_few, blocks):  # the same training spots: none of the blocks
        assert torch.equal(a.node_mask, b.node_mask) and torch.equal(b.node_mask, torch.from_numpy(~blk))
    assert np.array_equal(scaler_all.mean, scaler_few.mean) and np.array_equal(scaler_all.std, scaler_few.std)
    assert [g.num_nodes for g in val_few] == [64, 49]  # whole slides: the unscored spots are halo
