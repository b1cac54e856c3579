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



def _edges_of(b):
    """A batch's edges as (source, target, attributes) in slide node numbers: independent of edge order."""
    src, dst = b.node_id[b.edge_index[0]], b.node_id[b.edge_index[1]]
    return sorted(zip(src.tolist(), dst.tolist(), map(tuple, b.edge_attr.tolist())))


def test_index_is_offsets_only_for_edges_sorted_by_target_and_any_order_gives_the_same_batches():
    """spatial_edges sorts edges by target: the index is then 8 bytes a node (the offsets); edges in another
    order need the sort permutation too and give the same halos and edges. Nodes outside node_mask are
    never reached."""
    g = _slide(200, seed=2, k=6)
    g.node_mask = torch.from_numpy(np.random.default_rng(3).random(200) < 0.8)
    perm = torch.from_numpy(np.random.default_rng(4).permutation(g.edge_index.shape[1]))
    shuffled = g.clone()
    shuffled.edge_index, shuffled.edge_attr = g.edge_index[:, perm], g.edge_attr[perm]
    kw = dict(batch_nodes=32, num_hops=2, shuffle=True, seed=1)
    a, b = SubgraphLoader([g], **kw), SubgraphLoader([shuffled], **kw)
    assert a.index_nbytes == b.index_nbytes == 0  # built when a batch first needs it
    present = set(np.where(g.node_mask.numpy())[0].tolist())
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.node_id, y.node_id) and torch.equal(x.center_mask, y.center_mask)
        assert _edges_of(x) == _edges_of(y)
        assert set(x.node_id.tolist()) <= present
    assert a.index_nbytes == 8 * (200 + 1)
    assert b.index_nbytes == 8 * (200 + 1) + 8 * g.edge_index.shape[1]


def test_node_mask_batches_are_those_of_the_graph_without_the_masked_nodes():
    """A node_mask graph (the training part of a slide) gives the batches of the same slide with the masked
    nodes and their edges dropped (node_subgraph), up to the nodes' numbering."""
    from gnnst.train.prepare import node_subgraph, with_node_mask

    g = _slide(250, seed=6, k=6)
    keep = np.random.default_rng(7).random(250) < 0.7
    kept = torch.from_numpy(np.where(keep)[0])
    kw = dict(batch_nodes=40, num_hops=2, shuffle=True, seed=2)
    masked, dropped = SubgraphLoader([with_node_mask(g, keep)], **kw), SubgraphLoader([node_subgraph(g, keep)], **kw)
    n = 0
    for a, b in zip(masked, dropped, strict=True):
        assert torch.equal(a.node_id, kept[b.node_id]) and torch.equal(a.center_mask, b.center_mask)
        assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_attr, b.edge_attr)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        n += 1
    assert n > 3
