"""Subgraph mini-batching that works for a slide of any size, without pyg-lib or torch-sparse.

Each slide is cut into spatial tiles of at most ``batch_nodes`` centre spots (a k-d split along the
longer side), each tile gets a ``num_hops`` halo of neighbours so that message passing at the centre
sees its full receptive field, and small tiles of several slides are packed into one ``Batch``.
Cost per batch is proportional to the subgraph, never to the slide. A slide's index over edge
targets is built when a batch first needs it: the offsets of each node's incoming edges, 8 bytes a
spot, since :func:`gnnst.graph.edges.spatial_edges` stores edges sorted by target (other edge orders
add a sort permutation, 8 bytes an edge); nodes outside ``node_mask`` are left out per batch, so no
slide's edges are copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from gnnst import keys

if TYPE_CHECKING:
    from torch_geometric.data import Batch, Data


def spatial_tiles(pos: np.ndarray, max_nodes: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Split node ids by recursive bisection of ``pos`` ``[N, 2]`` into parts of <= ``max_nodes``.

    With ``rng`` the split points are jittered, so tiles differ between epochs.
    """
    parts, stack = [], [np.arange(len(pos))]
    while stack:
        ids = stack.pop()
        if len(ids) <= max_nodes:
            parts.append(ids)
            continue
        p = pos[ids]
        axis = int(np.argmax(p.max(0) - p.min(0)))
        order = ids[np.argsort(p[:, axis], kind="stable")]
        frac = 0.5 if rng is None else rng.uniform(0.35, 0.65)
        cut = min(max(int(len(order) * frac), 1), len(order) - 1)
        stack += [order[:cut], order[cut:]]
    return parts


def _widen(t):
    """float16/bfloat16 rows (a large slide stored at half the memory) -> float32 for the model."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


class _CSR:
    """Incoming edges of each target node ``i``: edge ids ``order[indptr[i]:indptr[i+1]]``, or the positions
    ``indptr[i]:indptr[i+1]`` themselves when the edges are sorted by target (``order`` is then ``None``)."""

    def __init__(self, edge_index: np.ndarray, num_nodes: int):
        dst = edge_index[1]
        self.indptr = np.zeros(num_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(dst, minlength=num_nodes), out=self.indptr[1:])
        by_target = bool(np.all(dst[1:] >= dst[:-1]))
        self.order = None if by_target else np.argsort(dst, kind="stable")  # edge ids sorted by target
        self.src = edge_index[0]

    @property
    def nbytes(self) -> int:
        """Bytes this index owns (``src`` is a view of the edges)."""
        return self.indptr.nbytes + (0 if self.order is None else self.order.nbytes)

    def in_edges(self, nodes: np.ndarray) -> np.ndarray:
        """Ids of all edges whose target is in ``nodes``."""
        starts, ends = self.indptr[nodes], self.indptr[nodes + 1]
        lens = ends - starts
        if lens.sum() == 0:
            return np.zeros(0, dtype=np.int64)
        offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        at = np.arange(lens.sum()) + offs
        return at if self.order is None else self.order[at]


def halo_subgraph(csr: _CSR, centre: np.ndarray, num_nodes: int, num_hops: int,
                  inside: np.ndarray | None = None, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nodes within ``num_hops`` (along incoming edges) of ``centre`` and the edges among them.

    Returns ``(subset, edge_ids)``: ``subset`` starts with ``centre`` in order; ``edge_ids`` are the
    edges whose source and target both lie in ``subset``.

    ``inside``: an all-False ``[num_nodes]`` bool scratch array to reuse across calls (it is all-False
    again on return), so that a call costs in proportion to the subgraph, not to the slide.
    ``present``: ``[num_nodes]`` bool, the nodes that belong to the graph (``centre`` among them); the
    others are never reached, as if they and their edges were not there.
    """
    if inside is None:
        inside = np.zeros(num_nodes, dtype=bool)
    subset = [centre]
    try:
        inside[centre] = True
        frontier = centre
        for _ in range(num_hops):
            nb = np.unique(csr.src[csr.in_edges(frontier)])
            nb = nb[~inside[nb] if present is None else present[nb] & ~inside[nb]]
            if len(nb) == 0:
                break
            inside[nb] = True
            subset.append(nb)
            frontier = nb
        subset = np.concatenate(subset)
        e = csr.in_edges(subset)
        e = e[inside[csr.src[e]]]
    finally:
        for part in subset if isinstance(subset, list) else [subset]:
            inside[part] = False
    return subset, np.sort(e)


def node_mask(g: "Data") -> np.ndarray | None:
    """``g.node_mask`` ``[N]`` bool as numpy: the nodes that belong to the graph (the others are absent:
    neither centres nor halo, as if :func:`gnnst.train.prepare.node_subgraph` had dropped them); ``None``
    when every node does."""
    m = getattr(g, "node_mask", None)
    return None if m is None else np.asarray(m.cpu().numpy() if hasattr(m, "cpu") else m, dtype=bool)


def kept_edges(g: "Data", keep: np.ndarray | None) -> np.ndarray | None:
    """Ids ``[E']`` (ascending) of the edges of ``g`` whose ends are both in ``keep``; ``None`` = all."""
    if keep is None:
        return None
    ei = g.edge_index.cpu().numpy()
    return np.where(keep[ei[0]] & keep[ei[1]])[0]


def input_rows(g: "Data", rows=None):
    """The model's input ``[n, D]`` of spots ``rows`` (a long tensor; all when ``None``) of ``g``, in its storage
    dtype: ``x_views[x_pick[i], i]`` while ``g`` carries an epoch's ``x_pick`` (training-only stain
    augmentation, :mod:`gnnst.train.views`), else ``x``."""
    import torch

    pick = getattr(g, keys.DATA_X_PICK, None)
    if pick is None:
        return g.x if rows is None else g.x[rows]
    if rows is None:
        rows = torch.arange(len(pick))
    return getattr(g, keys.DATA_X_VIEWS)[pick[rows], rows]


def present_rows(g: "Data", t):
    """Rows of ``t`` (``[N, ...]``, a node attribute of ``g``) of the nodes that belong to ``g``
    (:func:`node_mask`), in node order: what a model's ``after_fit`` takes of a training graph."""
    m = getattr(g, "node_mask", None)
    return t if m is None else t[m.to(t.device) if hasattr(t, "device") else m.cpu().numpy()]


@dataclass
class _Slide:
    data: "Data"
    pos: np.ndarray
    present: np.ndarray | None  # [N] the nodes that belong to the graph (node_mask); None = all
    node_mask: np.ndarray | None  # nodes that may be centres: present and in centre_masks
    csr: _CSR | None = None  # built when a batch first needs it


class SubgraphLoader:
    """Iterate mini-batches of spatial-tile subgraphs over a list of slide graphs.

    Args:
        graphs: one ``Data`` per slide with ``x``, ``pos``, ``edge_index``, ``edge_attr`` (``y`` optional) and
            optionally ``node_mask`` ``[N]`` bool: only those nodes are in the graph (:func:`node_mask`).
        batch_nodes: most centre spots per batch; small tiles of several slides are packed together.
        num_hops: halo depth (at least the model's message-passing rounds).
        shuffle: new tiles and a new order every epoch (needs ``seed``).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        centre_masks: optional ``[N]`` bool per slide: only these nodes are centres (loss-bearing).

    Memory besides the slides' own arrays: per slide its masks (1 byte a spot each) and, once a batch
    has used it, its index (8 bytes a spot: :class:`_CSR`); one scratch of the largest slide.

    ``x`` and ``y`` may be stored as float16/bfloat16 (half the memory of a large slide); each batch
    gets them as float32. Each batch is a ``torch_geometric.data.Batch`` with ``center_mask`` ``[N]`` (bool, the centre
    spots), ``node_id`` ``[N]`` (node number within its slide) and ``slide`` ``[N]`` (slide number in
    ``graphs``). Call :meth:`set_epoch` before iterating when shuffling.
    """

    def __init__(self, graphs: Sequence["Data"], *, batch_nodes: int = 512, num_hops: int = 2,
                 shuffle: bool = False, seed: int = 0, centre_masks: Sequence[np.ndarray | None] | None = None):
        self.slides = []
        for i, g in enumerate(graphs):
            keep = node_mask(g)
            mask = None if centre_masks is None or centre_masks[i] is None else np.asarray(centre_masks[i], dtype=bool)
            if keep is not None:
                mask = keep if mask is None else keep & mask
            self.slides.append(_Slide(g, g.pos.cpu().numpy(), keep, mask))
        self.batch_nodes = batch_nodes
        self.num_hops = num_hops
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        n = max((int(g.num_nodes) for g in graphs), default=0)  # scratch of every slide's batches, allocated once:
        self._inside = np.zeros(n, dtype=bool)  # [N] halo_subgraph's, all False between calls
        self._remap = np.full(n, -1, dtype=np.int64)  # [N] slide node -> batch node, all -1 between calls

    def csr(self, si: int) -> _CSR:
        """Slide ``si``'s index over edge targets, built the first time it is needed."""
        s = self.slides[si]
        if s.csr is None:
            s.csr = _CSR(s.data.edge_index.cpu().numpy(), s.data.num_nodes)
        return s.csr

    @property
    def index_nbytes(self) -> int:
        """Bytes of the slides' indexes built so far."""
        return sum(s.csr.nbytes for s in self.slides if s.csr is not None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _parts(self) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng(self.seed + self.epoch) if self.shuffle else None
        parts = []
        for si, s in enumerate(self.slides):
            nodes = np.arange(s.data.num_nodes) if s.node_mask is None else np.where(s.node_mask)[0]
            for t in spatial_tiles(s.pos[nodes], self.batch_nodes, rng):
                parts.append((si, nodes[t]))
        if rng is not None:
            parts = [parts[i] for i in rng.permutation(len(parts))]
        return parts

    def batches_of_parts(self) -> list[list[tuple[int, np.ndarray]]]:
        """The epoch's tiles, packed greedily into batches of at most ``batch_nodes`` centres."""
        groups, cur, n = [], [], 0
        for part in self._parts():
            if cur and n + len(part[1]) > self.batch_nodes:
                groups.append(cur)
                cur, n = [], 0
            cur.append(part)
            n += len(part[1])
        if cur:
            groups.append(cur)
        return groups

    def __len__(self) -> int:
        return len(self.batches_of_parts())

    def make_batch(self, group: list[tuple[int, np.ndarray]]) -> "Batch":
        import torch
        from torch_geometric.data import Batch, Data

        items = []
        for si, centre in group:
            s = self.slides[si]
            g = s.data
            csr = self.csr(si)
            subset, eids = halo_subgraph(csr, centre, g.num_nodes, self.num_hops, self._inside, s.present)
            remap = self._remap
            remap[subset] = np.arange(len(subset))
            sub_ei = remap[g.edge_index.cpu().numpy()[:, eids]]  # a view of the slide's edges: no copy
            remap[subset] = -1
            sub_t = torch.from_numpy(subset)
            d = Data(x=_widen(input_rows(g, sub_t)), pos=g.pos[sub_t], edge_index=torch.from_numpy(sub_ei),
                     edge_attr=g.edge_attr[torch.from_numpy(eids)], num_nodes=len(subset))
            if getattr(g, "y", None) is not None:
                d.y = _widen(g.y[sub_t])
            cm = torch.zeros(len(subset), dtype=torch.bool)
            cm[: len(centre)] = True
            d.center_mask = cm
            d.center_index = torch.arange(len(centre))  # the same rows, selectable without a host sync
            d.node_id = sub_t.clone()
            d.slide = torch.full((len(subset),), si, dtype=torch.long)
            items.append(d)
        return Batch.from_data_list(items)

    def __iter__(self) -> Iterator["Batch"]:
        for group in self.batches_of_parts():
            yield self.make_batch(group)
