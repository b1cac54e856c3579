import numpy as np
import pytest

from gnnst.errors import GnnstError
from gnnst.graph.edges import edge_features, spatial_edges

# five hand-placed spots (µm):   2 . 3
#                                0 . 1 . . . 4
POS = np.array([[0, 0], [100, 0], [0, 100], [100, 100], [300, 0]], dtype=float)


def edges_as_set(ei):
    return {(int(s), int(t)) for s, t in ei.T}


def test_knn_exact_edges():
    ei = spatial_edges(POS, k=2)
    # each target receives its two nearest; ties broken by lower index
    assert ei.tolist() == [[1, 2, 0, 3, 0, 3, 1, 2, 1, 3],
                           [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]


def test_radius_exact_edges():
    ei = spatial_edges(POS, k=None, radius_um=150.0)
    expected = {(1, 0), (2, 0), (3, 0), (0, 1), (2, 1), (3, 1), (0, 2), (1, 2), (3, 2), (0, 3), (1, 3), (2, 3)}
    assert edges_as_set(ei) == expected  # spot 4 is 200 µm from spot 1: isolated
    assert ei.shape[1] == len(expected)


def test_knn_and_radius_union_without_duplicates():
    ei = spatial_edges(POS, k=1, radius_um=110.0)
    s = edges_as_set(ei)
    assert len(s) == ei.shape[1]
    assert (1, 4) in s and (0, 1) in s and (3, 1) in s and (2, 3) in s


def test_no_self_loops_and_sorted_by_target():
    rng = np.random.default_rng(0)
    pos = rng.random((50, 2)) * 1000
    ei = spatial_edges(pos, k=6, radius_um=120.0)
    assert not np.any(ei[0] == ei[1])
    assert np.all(np.diff(ei[1]) >= 0)
    assert np.all(np.bincount(ei[1], minlength=50) >= 6)


def test_edge_features_offsets_and_distance():
    ei = np.array([[1, 2], [0, 0]])
    ea = edge_features(POS, ei)
    np.testing.assert_allclose(ea, [[100, 0, 100], [0, 100, 100]])


def test_bad_parameters():
    with pytest.raises(GnnstError, match="graph.k"):
        spatial_edges(POS, k=5)  # only 4 other spots
    with pytest.raises(GnnstError, match="at least one"):
        spatial_edges(POS, k=None, radius_um=None)


def test_transform_and_no_cross_slide_edges():
    import torch
    from torch_geometric.data import Batch, Data

    from gnnst.graph.transforms import SpatialGraph

    t = SpatialGraph(k=2)
    assert repr(t) == "SpatialGraph(k=2, radius_um=None)"
    # two slides at the same coordinates: batched, their graphs must stay block-diagonal
    a = t(Data(pos=torch.tensor(POS, dtype=torch.float32), num_nodes=5))
    b = t(Data(pos=torch.tensor(POS, dtype=torch.float32), num_nodes=5))
    batch = Batch.from_data_list([a, b])
    src, dst = batch.edge_index
    assert torch.equal(batch.batch[src], batch.batch[dst])
    assert batch.edge_index.shape[1] == 20
    assert torch.equal(a.edge_index, torch.from_numpy(spatial_edges(POS, k=2)))
