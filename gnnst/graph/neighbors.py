"""A gnnst spot graph in AnnData, where ``sq.gr.spatial_neighbors`` writes its own, so squidpy's
statistics and plots run on it unchanged (``obsp['spatial_connectivities']``,
``obsp['spatial_distances']``, ``uns['spatial_neighbors']``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData


def add_spatial_graph(
    adata: "AnnData",
    edge_index: np.ndarray,
    distances: np.ndarray,
    *,
    k: int | None = None,
    radius_um: float | None = None,
    key_added: str = keys.SPATIAL,
    copy: bool = False,
) -> "AnnData | None":
    """Store a gnnst graph the way ``sq.gr.spatial_neighbors`` stores its own.

    Args:
        adata: the graph's spots, in node order.
        edge_index: ``[2, E]``, row 0 the neighbour (source), row 1 the centre spot (target).
        distances: ``[E]`` edge lengths in µm.
        k, radius_um: the graph parameters, recorded in ``uns[...]['params']``.
        key_added: prefix of the keys, as in squidpy.
        copy: return a modified copy instead of writing into ``adata``.

    Sets the following fields (squidpy's convention: row = spot, column = one of its neighbours):
        ``adata.obsp['{key_added}_connectivities']`` ``[N, N]`` CSR float32 (1 per edge),
        ``adata.obsp['{key_added}_distances']`` ``[N, N]`` CSR float64 (µm),
        ``adata.uns['{key_added}_neighbors']`` (``connectivities_key``, ``distances_key``, ``params``).
    """
    import scipy.sparse as sp

    if copy:
        adata = adata.copy()
    n = adata.n_obs
    src, dst = np.asarray(edge_index, dtype=np.int64)
    if len(src) and (max(src.max(), dst.max()) >= n or min(src.min(), dst.min()) < 0):
        raise GnnstError(f"spatial graph: an edge names spot {max(src.max(), dst.max())}, but there are {n} spots")
    conn = sp.csr_matrix((np.ones(len(src), dtype=np.float32), (dst, src)), shape=(n, n))
    dist = sp.csr_matrix((np.asarray(distances, dtype=np.float64), (dst, src)), shape=(n, n))
    conn.sort_indices()
    dist.sort_indices()
    conn_key, dist_key = f"{key_added}_connectivities", f"{key_added}_distances"
    adata.obsp[conn_key] = conn
    adata.obsp[dist_key] = dist
    adata.uns[f"{key_added}_neighbors"] = {
        "connectivities_key": conn_key, "distances_key": dist_key,
        "params": {"coord_type": "generic", "n_neighbors": k, "radius": radius_um, "transform": None,
                   "units": "um", "source": "gnnst"},
    }
    return adata if copy else None
