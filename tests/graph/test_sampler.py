import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from gnnst.graph.edges import edge_features, spatial_edges
from gnnst.graph.sampler import SubgraphLoader, spatial_tiles


def _slide(n, seed=0, k=4):
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2)) * 2000
    ei = spatial_edges(pos, k=k)
    return Data(x=torch.randn(n, 8), y=torch.randn(n, 3), pos=torch.tensor(pos, dtype=torch.float32),
                edge_index=torch.from_numpy(ei), edge_attr=torch.from_numpy(edge_features(pos, ei)), num_nodes=n)


def test_tiles_partition_and_bound():
    pos = np.random.default_rng(1).random((1000, 2))
    parts = spatial_tiles(pos, 128)
    allids = np.sort(np.concatenate(parts))
    assert np.array_equal(allids, np.arange(1000))
    assert max(len(p) for p in parts) <= 128


@pytest.mark.parametrize("num_hops", [1, 2])
def test_every_centre_once_with_full_receptive_field(num_hops):
    g = _slide(300)
    loader = SubgraphLoader([g], batch_nodes=64, num_hops=num_hops, shuffle=True, seed=3)
    seen = []
    for b in loader:
        assert int(b.center_mask.sum()) <= 64
        centres = b.node_id[b.center_mask]
        seen.append(centres)
        # every in-edge of a centre (and of its 1-hop neighbours when num_hops=2) is present
        full = {(int(s), int(t)) for s, t in g.edge_index.T}
        sub = {(int(b.node_id[s]), int(b.node_id[t])) for s, t in b.edge_index.T}
        assert sub <= full
        need = {(s, t) for (s, t) in full if t in set(centres.tolist())}
        assert need <= sub
        torch.testing.assert_close(b.x, g.x[b.node_id])
    seen = torch.cat(seen)
    assert torch.equal(torch.sort(seen).values, torch.arange(300))


def test_small_slides_are_packed_and_never_joined():
    gs = [_slide(40, seed=i) for i in range(3)]
    loader = SubgraphLoader(gs, batch_nodes=100, num_hops=2)
    batches = list(loader)
    assert len(batches) == 2  # 40 + 40 | 40
    b = batches[0]
    src, dst = b.edge_index
    assert torch.equal(b.slide[src], b.slide[dst])  # no edge joins two slides


def test_centre_masks_restrict_centres():
    g = _slide(100)
    mask = np.zeros(100, dtype=bool)
    mask[:30] = True
    centres = torch.cat([b.node_id[b.center_mask] for b in SubgraphLoader([g], batch_nodes=16, centre_masks=[mask])])
    assert torch.equal(torch.sort(centres).values, torch.arange(30))


def _batch_arrays(b):
    return [t.numpy().copy() for t in (b.x, b.y, b.pos, b.edge_index, b.edge_attr, b.node_id, b.slide, b.center_mask)]


@pytest.mark.parametrize("with_masks", [False, True])
def test_index_budget_changes_memory_not_batches(with_masks):
    """A budget that keeps one slide's index at a time (built again and again) gives the same batches as
    keeping every slide's; what is held stays within the largest slide's index."""
    gs = [_slide(n, seed=i, k=6) for i, n in enumerate((90, 150, 60, 120))]
    masks = None
    if with_masks:  # present nodes (node_mask: the kept-edges path) and centre masks
        rng = np.random.default_rng(5)
        for g in gs:
            g.node_mask = torch.from_numpy(rng.random(g.num_nodes) < 0.8)
        masks = [rng.random(g.num_nodes) < 0.5 for g in gs]
    kw = dict(batch_nodes=32, num_hops=2, shuffle=True, seed=7, centre_masks=masks)
    keep_all, one = SubgraphLoader(gs, index_bytes=None, **kw), SubgraphLoader(gs, index_bytes=1, **kw)
    largest = max(SubgraphLoader([g], index_bytes=None, **dict(kw, centre_masks=None)).index(0).nbytes for g in gs)
    for epoch in range(2):
        keep_all.set_epoch(epoch)
        one.set_epoch(epoch)
        pairs = list(zip(keep_all, one, strict=True))
        assert len(pairs) > len(gs)
        for a, b in pairs:
            for u, v in zip(_batch_arrays(a), _batch_arrays(b), strict=True):
                np.testing.assert_array_equal(u, v)
            assert one.index_nbytes <= largest and len(one._indexes) == 1
    assert keep_all.indexes_built == len(gs) and len(keep_all._indexes) == len(gs)
    assert one.indexes_built > len(gs)  # dropped and built again: the budget was binding


def test_make_loader_passes_the_index_budget():
    from gnnst.config import load_config
    from gnnst.train.trainer import make_loader

    g = _slide(50)
    cfg = load_config(None, ["train.sampler_index_mb=3", "train.sampler=host"])
    assert make_loader([g], cfg, "cpu", num_hops=2, shuffle=False).index_bytes == 3 * 2**20
    cfg = load_config(None, ["train.sampler_index_mb=null", "train.sampler=host"])
    assert make_loader([g], cfg, "cpu", num_hops=2, shuffle=False).index_bytes is None
