"""`to_networkx` on hand-placed graphs and on an exported AnnData."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.data import Data

from gnnst import keys
from gnnst.errors import GnnstError
from gnnst.export.anndata import add_spatial_graph, concat_slides
from gnnst.export.networkx import to_networkx
from gnnst.graph.edges import slide_graph


def _line_data() -> Data:
    """Four spots on a line at x = 0, 100, 300, 600 µm; each receives an edge from its nearest spot."""
    pos = torch.tensor([[0.0, 0.0], [100.0, 0.0], [300.0, 0.0], [600.0, 0.0]])
    ei = torch.tensor([[1, 0, 1, 2], [0, 1, 2, 3]])
    off = pos[ei[0]] - pos[ei[1]]
    d = Data(pos=pos, edge_index=ei, edge_attr=torch.cat([off, off.norm(dim=1, keepdim=True)], 1), num_nodes=4)
    d.pixel = pos / 2
    d.slide_id = "A"
    d.barcodes = ["a", "b", "c", "d"]
    return d


def test_data_to_networkx_directed_and_undirected():
    g = to_networkx(_line_data(), directed=True)
    assert sorted(g.edges()) == [(0, 1), (1, 0), (1, 2), (2, 3)]  # neighbour -> centre
    assert g.edges[2, 3]["distance"] == pytest.approx(300.0)
    assert g.nodes[2] == {"pos": (300.0, 0.0), "pixel": (150.0, 0.0), "slide": "A", "barcode": "c"}
    u = to_networkx(_line_data())
    assert not u.is_directed() and u.number_of_edges() == 3  # 0-1 is one undirected edge
    assert dict(u.degree()) == {0: 1, 1: 2, 2: 2, 3: 1}


def _slide(slide_id: str, n: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.random((n, 3)).astype(np.float32),
                   obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]), var=pd.DataFrame(index=["g0", "g1", "g2"]))
    a.layers[keys.PRED] = a.X.copy()
    a.obsm[keys.SPATIAL] = rng.random((n, 2)) * 100
    a.obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * n)
    a.uns[keys.UNS_GNNST] = {keys.MPP: 2.0, "config": "{}", "metrics": "{}"}
    g = slide_graph(a.obsm[keys.SPATIAL], 2.0, k=2, radius_um=None)
    add_spatial_graph(a, g.edge_index, g.distances, k=2)
    return a


def test_anndata_to_networkx_matches_the_graph_and_keeps_slides_apart():
    import networkx as nx

    one = _slide("A", 7, 0)
    g = to_networkx(one, directed=True)
    assert g.number_of_nodes() == 7 and g.number_of_edges() == 14  # k = 2 into every spot
    rows, cols = one.obsp[keys.CONNECTIVITIES].nonzero()
    assert sorted(g.edges()) == sorted(zip(cols.tolist(), rows.tolist()))
    u, v = next(iter(g.edges()))
    want = np.linalg.norm(one.obsm[keys.SPATIAL][u] - one.obsm[keys.SPATIAL][v]) * 2.0
    assert g.edges[u, v]["distance"] == pytest.approx(want)
    assert g.nodes[0]["pos"] == pytest.approx(tuple(one.obsm[keys.SPATIAL][0] * 2.0))
    both = concat_slides([one, _slide("B", 5, 1)])
    gb = to_networkx(both)
    slides = nx.get_node_attributes(gb, "slide")
    assert all(slides[a] == slides[b] for a, b in gb.edges())
    assert sum(1 for s in slides.values() if s == "B") == 5
    assert nx.number_connected_components(gb) >= 2


def test_to_networkx_errors():
    with pytest.raises(GnnstError, match="no obsp"):
        to_networkx(ad.AnnData(np.zeros((2, 1))))
    with pytest.raises(GnnstError, match="expected a torch_geometric Data or an AnnData"):
        to_networkx([1, 2])
