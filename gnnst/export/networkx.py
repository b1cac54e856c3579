"""A gnnst spot graph as a networkx graph, for graph statistics (degrees, components, paths).

Nodes are the spot indices ``0..N-1`` in the order of the ``Data`` / AnnData, with attributes
``pos`` (µm), ``pixel``, ``slide`` and ``barcode``; each edge carries ``distance`` (µm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import networkx as nx
    from anndata import AnnData
    from torch_geometric.data import Data


def to_networkx(graph: Union["Data", "AnnData"], *, directed: bool = False,
                connectivity_key: str = keys.CONNECTIVITIES, distance_key: str = keys.DISTANCES
                ) -> Union["nx.Graph", "nx.DiGraph"]:
    """Convert a gnnst graph to networkx.

    Args:
        graph: a slide's PyG ``Data`` (``pos`` in µm, ``edge_index``, ``edge_attr``), or an AnnData
            with the graph in ``obsp`` (an export of :mod:`gnnst.export.anndata`; several slides
            concatenated give a graph with one component or more per slide and no edge between them).
        directed: keep edge direction neighbour -> centre spot (``DiGraph``); by default a k-nearest
            graph's one-way edges become undirected edges (``Graph``).
        connectivity_key, distance_key: ``obsp`` keys of an AnnData's graph.

    Returns a ``networkx.Graph`` (or ``DiGraph``); node attributes ``pos`` ``(x, y)`` µm (``None`` when
    an AnnData has no ``mpp``), ``pixel`` ``(x, y)``, ``slide``, ``barcode``; edge attribute ``distance`` µm.
    """
    import networkx as nx

    if hasattr(graph, "edge_index"):
        nodes, src, dst, dist = _from_data(graph)
    elif hasattr(graph, "obsp"):
        nodes, src, dst, dist = _from_anndata(graph, connectivity_key, distance_key)
    else:
        raise GnnstError(f"to_networkx: expected a torch_geometric Data or an AnnData, got {type(graph).__name__}")
    g = nx.DiGraph() if directed else nx.Graph()
    g.add_nodes_from(enumerate(nodes))
    g.add_edges_from((int(s), int(t), {"distance": float(d)}) for s, t, d in zip(src, dst, dist))
    return g


def _from_data(data: "Data") -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    n = int(data.num_nodes)
    pos = data.pos.detach().cpu().numpy().astype(np.float64) if getattr(data, "pos", None) is not None else None
    pixel = data.pixel.detach().cpu().numpy() if getattr(data, "pixel", None) is not None else None
    slide = str(getattr(data, "slide_id", ""))
    barcodes = list(getattr(data, "barcodes", None) or [str(i) for i in range(n)])
    src, dst = data.edge_index.detach().cpu().numpy()
    if getattr(data, "edge_attr", None) is not None and data.edge_attr.shape[1] >= 3:
        dist = data.edge_attr[:, 2].detach().cpu().numpy().astype(np.float64)
    elif pos is not None:
        dist = np.linalg.norm(pos[src] - pos[dst], axis=1)
    else:
        dist = np.full(len(src), np.nan)
    nodes = [{"pos": None if pos is None else (float(pos[i, 0]), float(pos[i, 1])),
              "pixel": None if pixel is None else (float(pixel[i, 0]), float(pixel[i, 1])),
              "slide": slide, "barcode": str(barcodes[i])} for i in range(n)]
    return nodes, src, dst, dist


def _from_anndata(adata: "AnnData", conn_key: str, dist_key: str) -> tuple[list[dict], np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    import scipy.sparse as sp

    if conn_key not in adata.obsp:
        raise GnnstError(f"to_networkx: AnnData has no obsp['{conn_key}'] (has: {', '.join(adata.obsp) or 'none'}); "
                         "export with `gnnst export` or run sq.gr.spatial_neighbors first")
    conn = sp.coo_matrix(adata.obsp[conn_key])
    dst, src = conn.row, conn.col  # squidpy: row = spot, column = its neighbour
    if dist_key in adata.obsp:
        dmat = sp.csr_matrix(adata.obsp[dist_key])
        dist = np.asarray(dmat[dst, src]).ravel().astype(np.float64)
    else:
        dist = np.full(len(src), np.nan)
    pixel = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64) if keys.SPATIAL in adata.obsm else None
    slides = (adata.obs[keys.SLIDE_ID].astype(str).to_numpy() if keys.SLIDE_ID in adata.obs
              else np.full(adata.n_obs, ""))
    mpp = _mpp_per_spot(adata, slides)
    nodes = []
    for i, name in enumerate(adata.obs_names):
        px = None if pixel is None else (float(pixel[i, 0]), float(pixel[i, 1]))
        pos = None if px is None or not np.isfinite(mpp[i]) else (px[0] * mpp[i], px[1] * mpp[i])
        nodes.append({"pos": pos, "pixel": px, "slide": str(slides[i]), "barcode": str(name)})
    return nodes, src, dst, dist


def _mpp_per_spot(adata: "AnnData", slides: np.ndarray) -> np.ndarray:
    """Micrometres per pixel of each spot from ``uns['gnnst']`` (one slide, or ``slides`` of a concat)."""
    meta = adata.uns.get(keys.UNS_GNNST, {})
    out = np.full(adata.n_obs, np.nan)
    if keys.MPP in meta:
        out[:] = float(meta[keys.MPP])
    for s, m in (meta.get("slides") or {}).items():
        if keys.MPP in m:
            out[slides == s] = float(m[keys.MPP])
    return out
