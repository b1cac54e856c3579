"""Spatial edges between spots of one slide: k nearest and/or within a radius in µm.

:func:`slide_graph` is the one place a slide's graph is built from its pixel coordinates and µm per
pixel: graph building, training, prediction, export and the benchmarks all call it (the
:class:`~gnnst.graph.transforms.SpatialGraph` transform calls :func:`graph_from_pos`, the same code
from positions already in µm).

PyG's ``knn_graph``/``radius_graph`` need pyg-lib or torch-cluster, which have no PyPI wheels; edges
are built with scipy's cKDTree instead. Ties in distance are broken by the lower node index, so the
result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from gnnst.errors import GnnstError


@dataclass
class SlideGraph:
    """One slide's spot graph as numpy arrays.

    Attributes:
        pos: ``[N, 2]`` float64 spot centres in µm.
        edge_index: ``[2, E]`` int64, row 0 neighbour (source), row 1 centre (target).
        edge_attr: ``[E, 3]`` float32 (dx, dy, distance) in µm, source minus target.
    """

    pos: np.ndarray
    edge_index: np.ndarray
    edge_attr: np.ndarray

    @property
    def distances(self) -> np.ndarray:
        """``[E]`` edge lengths in µm."""
        return self.edge_attr[:, 2]


def slide_graph(pixel: np.ndarray, mpp: float, *, k: int | None, radius_um: float | None) -> SlideGraph:
    """The spot graph of one slide from full-resolution pixel coordinates ``[N, 2]`` (x, y) and
    micrometres per pixel: positions in µm, edges of :func:`spatial_edges`, features of
    :func:`edge_features`."""
    pos = np.asarray(pixel, dtype=np.float64) * float(mpp)  # [N, 2] µm
    return graph_from_pos(pos, k=k, radius_um=radius_um)


def check_spot_counts(spots: Mapping[str, int], ks: Sequence[tuple[str, int | None]], *,
                      hint: str = "lower it, or leave the slide out (data.slides)") -> None:
    """Every slide can give each spot its ``k`` nearest other spots: ``spots`` maps a slide (as named in
    messages: ``"slide 'S1'"``) to its spot count, ``ks`` lists ``(setting, k)`` with the setting as
    messages name it (``("graph.k=6", 6)``; ``k=None`` is skipped). Called once the slides are read, before an encoder loads; raises a one-line
    :class:`GnnstError` naming the slide, the key and ``hint``."""
    for where, k in ks:
        if k is None:
            continue
        for slide, n in spots.items():
            if n <= k:
                raise GnnstError(f"{slide} has {n} spots, too few for {where} (each spot is joined to "
                                 f"its {k} nearest other spots, so a slide needs at least {k + 1}); {hint}")


def graph_from_pos(pos: np.ndarray, *, k: int | None, radius_um: float | None) -> SlideGraph:
    """:func:`slide_graph` for positions already in µm ``[N, 2]``."""
    pos = np.asarray(pos, dtype=np.float64)
    ei = spatial_edges(pos, k=k, radius_um=radius_um)
    return SlideGraph(pos=pos, edge_index=ei, edge_attr=edge_features(pos, ei))


def spatial_edges(pos: np.ndarray, *, k: int | None = 6, radius_um: float | None = None) -> np.ndarray:
    """Edges of one slide's spot graph.

    Args:
        pos: spot centres ``[N, 2]`` in micrometres.
        k: each spot receives edges from its ``k`` nearest other spots (``None`` = off).
        radius_um: each spot also receives edges from every other spot within this distance
            (``None`` = off).

    Returns:
        ``edge_index`` ``[2, E]`` int64, row 0 the neighbour (source), row 1 the centre (target),
        sorted by target, then distance, then source; no self loops, no duplicates.
    """
    from scipy.spatial import cKDTree

    pos = np.asarray(pos, dtype=np.float64)
    n = len(pos)
    if k is None and radius_um is None:
        raise GnnstError("graph: set at least one of graph.k and graph.radius_um")
    if k is not None and k < 1:
        raise GnnstError(f"config key 'graph.k' must be >= 1 or null, got {k}")
    if radius_um is not None and radius_um <= 0:
        raise GnnstError(f"config key 'graph.radius_um' must be > 0 or null, got {radius_um}")
    if k is not None and n <= k:
        raise GnnstError(f"graph: a slide with {n} spots cannot give each spot {k} neighbours (graph.k={k})")
    if n == 0:
        return np.zeros((2, 0), dtype=np.int64)
    tree = cKDTree(pos)
    src_parts, dst_parts = [], []
    if k is not None:
        # ask for a few extra candidates so that ties at the k-th distance are broken by index
        q = min(n, k + 1 + 8)
        dist, idx = tree.query(pos, k=q)  # [N, q]
        dist = np.round(dist, 6)
        dist[idx == np.arange(n)[:, None]] = np.inf  # the spot itself sorts last, never among the first k
        order = np.lexsort((idx, dist), axis=-1)[:, :k]  # per row: by distance, then index  [N, k]
        src_parts.append(np.take_along_axis(idx, order, axis=1).reshape(-1))
        dst_parts.append(np.repeat(np.arange(n), k))
    if radius_um is not None:
        pairs = tree.query_pairs(r=radius_um, output_type="ndarray")  # [P, 2], i < j
        if len(pairs):
            src_parts += [pairs[:, 0], pairs[:, 1]]
            dst_parts += [pairs[:, 1], pairs[:, 0]]
    if not src_parts:
        return np.zeros((2, 0), dtype=np.int64)
    src = np.concatenate(src_parts).astype(np.int64)
    dst = np.concatenate(dst_parts).astype(np.int64)
    # dedupe (target, source) pairs as one int64 key; sort + mask, not np.unique, which is ~100x slower
    # here (numpy 2.x) on millions of keys
    key = np.sort(dst * n + src)
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    dst, src = key // n, key % n
    d = np.round(np.linalg.norm(pos[src] - pos[dst], axis=1), 6)
    order = np.lexsort((src, d, dst))
    return np.stack([src[order], dst[order]])


def edge_features(pos: np.ndarray, edge_index: np.ndarray) -> np.ndarray:
    """``edge_attr`` ``[E, 3]`` float32: (dx, dy, distance) in µm, source minus target."""
    off = pos[edge_index[0]] - pos[edge_index[1]]  # [E, 2]
    return np.concatenate([off, np.linalg.norm(off, axis=1, keepdims=True)], 1).astype(np.float32)
