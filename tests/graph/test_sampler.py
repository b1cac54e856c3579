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
