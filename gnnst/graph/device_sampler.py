"""Subgraph mini-batches cut on the training device, a whole epoch at once, from slides held there.

:class:`DeviceSubgraphLoader` gives the same batches as :class:`~gnnst.graph.sampler.SubgraphLoader`
(the same tiles, packed the same way, the same halo nodes in the same order, the same edges), but:

- the slides' arrays (``x``, ``y``, positions, edges) are copied to the device once;
- at the start of an epoch the halos of ALL its tiles are computed together with a few vectorised
  tensor operations on the device (a handful of host synchronisations per epoch, for array sizes);
- each step then only slices and gathers with offsets known on the host: no host synchronisation,
  no Python loop over nodes, no ``Batch.from_data_list``.

The tiles themselves (a k-d split of positions, cheap) are planned on the host by the
``SubgraphLoader`` it wraps, so both loaders share one definition of an epoch.

How the halos are computed: a (tile, node) pair is the key ``tile * N + node`` over the slides
concatenated (``N`` nodes in all). Hop ``h`` expands the pairs found at hop ``h - 1`` along their
incoming edges (CSR over targets), drops pairs already present (a sorted search), and keeps the rest
sorted by node id, as ``np.unique`` orders them on the host. A tile's nodes are its centres (in tile
order), then hop 1, hop 2, ...; its edges are the incoming edges of its nodes whose source is in the
tile, in edge order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from gnnst.graph.sampler import SubgraphLoader, input_rows, kept_edges, node_mask

if TYPE_CHECKING:
    import torch
    from torch_geometric.data import Data


def device_bytes(graphs: Sequence["Data"]) -> int:
    """Bytes the slides' arrays take on the device (``x``, ``y``, ``pos``, edges, edge features, index)."""
    total = 0
    for g in graphs:
        n, e = int(g.num_nodes), int(g.edge_index.shape[1])
        total += g.x.numel() * g.x.element_size() + n * 8 + e * (2 * 8 + 8 + g.edge_attr.shape[1] * 4)
        y = getattr(g, "y", None)
        if y is not None:
            total += y.numel() * y.element_size()
    return total


@dataclass
class _Plan:
    """An epoch's batches as slices of device arrays; ``node_start``/``edge_start`` ``[B + 1]`` on the host."""

    slot_node: "torch.Tensor"  # [M] global node of each batch slot (batches back to back)
    slot_level: "torch.Tensor"  # [M] hop at which the node joined its tile (0 = centre)
    slot_part: "torch.Tensor"  # [M] tile of each slot
    edge_src: "torch.Tensor"  # [T] slot of each batch edge's source
    edge_dst: "torch.Tensor"  # [T] slot of its target
    edge_row: "torch.Tensor"  # [T] row of edge_attr
    part_start: "torch.Tensor"  # [P + 1] first slot of each tile
    centre_slot: "torch.Tensor"  # [C] slots of the centres, ascending
    centre_start: list[int]  # [B + 1] first entry of centre_slot of each batch
    node_start: list[int]  # [B + 1] first slot of each batch
    edge_start: list[int]  # [B + 1] first edge of each batch
    part_bounds: list[int]  # [B + 1] first tile of each batch
    centres: list[int]  # [B] centre spots per batch


class DeviceSubgraphLoader:
    """:class:`~gnnst.graph.sampler.SubgraphLoader`'s batches, cut on ``device`` (see the module docstring).

    Args:
        graphs, batch_nodes, num_hops, shuffle, seed, centre_masks: as for ``SubgraphLoader``.
        device: where the slides are held and the batches are cut.

    Each batch is a ``Data`` with the attributes of ``SubgraphLoader``'s (``x``, ``pos``, ``edge_index``,
    ``edge_attr``, ``y`` when every graph has one, ``center_mask``, ``node_id``, ``slide``, ``batch``,
    ``ptr``, ``center_index``) already on ``device``, plus ``global_node`` ``[N]`` (the node in the slides
    concatenated).
    """

    def __init__(self, graphs: Sequence["Data"], *, batch_nodes: int = 512, num_hops: int = 2, shuffle: bool = False,
                 seed: int = 0, centre_masks: Sequence[np.ndarray | None] | None = None, device="cpu"):
        import torch

        self.host = SubgraphLoader(graphs, batch_nodes=batch_nodes, num_hops=num_hops, shuffle=shuffle, seed=seed,
                                   centre_masks=centre_masks)
        self.device = torch.device(device)
        self.num_hops = num_hops
        dev = self.device
        sizes = [int(g.num_nodes) for g in graphs]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [S + 1] first node of each slide
        self.num_nodes = int(self.offsets[-1])
        nb = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
        self.x = nb(torch.cat([g.x for g in graphs]))  # [N, D], storage dtype (widened per batch)
        has_y = all(getattr(g, "y", None) is not None for g in graphs)
        self.y = nb(torch.cat([g.y for g in graphs])) if has_y else None
        self.pos = nb(torch.cat([g.pos for g in graphs]))
        self.edge_attr = nb(torch.cat([g.edge_attr for g in graphs]))  # every edge of every slide
        self.slide_of = nb(torch.repeat_interleave(torch.arange(len(graphs)), torch.tensor(sizes)))
        # the edges among present nodes (as the host loader keeps them), numbered slide after slide
        src, dst, row, e_off = [], [], [], 0
        for i, g in enumerate(graphs):
            ei = g.edge_index.cpu().numpy()
            keep = kept_edges(g, node_mask(g))
            ids = np.arange(ei.shape[1]) if keep is None else keep
            src.append(ei[0, ids] + self.offsets[i])
            dst.append(ei[1, ids] + self.offsets[i])
            row.append(ids + e_off)
            e_off += ei.shape[1]
        src, dst, row = (np.concatenate(a).astype(np.int64) if a else np.zeros(0, np.int64) for a in (src, dst, row))
        order = np.argsort(dst, kind="stable")  # CSR over targets, edges in order within a target
        indptr = np.zeros(self.num_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(dst, minlength=self.num_nodes), out=indptr[1:])
        self.indptr = nb(torch.from_numpy(indptr))
        self.csr_src = nb(torch.from_numpy(src[order]))  # [E'] source of each edge, in CSR order
        self.csr_edge = nb(torch.from_numpy(order))  # [E'] its number among the kept edges (edge order)
        self.edge_row = nb(torch.from_numpy(row))  # [E'] row of edge_attr of each kept edge

    def refresh_x(self, graphs: Sequence["Data"]) -> None:
        """Copy the graphs' inputs (:func:`~gnnst.graph.sampler.input_rows`: the epoch's feature views,
        :mod:`gnnst.train.views`) to the device again, one slide at a time (a slide's rows are the only host
        copy made); the graphs are those the loader was made with."""
        n = sum(int(g.num_nodes) for g in graphs)
        if len(graphs) != len(self.offsets) - 1 or n != self.x.shape[0]:
            raise ValueError(f"refresh_x: {len(graphs)} graphs of {n} spots, the loader holds "
                             f"{len(self.offsets) - 1} of {self.x.shape[0]}")
        for i, g in enumerate(graphs):
            x = input_rows(g)
            self.x[int(self.offsets[i]):int(self.offsets[i + 1])].copy_(x.to(self.x.dtype))

    # --- the epoch, planned on the host, as in SubgraphLoader
    def set_epoch(self, epoch: int) -> None:
        self.host.set_epoch(epoch)

    def batches_of_parts(self) -> list[list[tuple[int, np.ndarray]]]:
        return self.host.batches_of_parts()

    def __len__(self) -> int:
        return len(self.host)

    def __iter__(self) -> Iterator["Data"]:
        return self.iter_batches(self.batches_of_parts())

    # --- the halos of every tile, on the device
    def _in_edges(self, nodes: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """For each incoming edge of each of ``nodes`` ``[F]``: (which of ``nodes``, CSR position)."""
        import torch

        start = self.indptr[nodes]
        deg = self.indptr[nodes + 1] - start
        total = int(deg.sum())  # a size: one synchronisation per call, a few per epoch
        which = torch.repeat_interleave(torch.arange(len(nodes), device=self.device), deg, output_size=total)
        first = torch.cumsum(deg, 0) - deg
        return which, start[which] + torch.arange(total, device=self.device) - first[which]

    def plan(self, groups: list[list[tuple[int, np.ndarray]]]) -> _Plan:
        """The slots and edges of every batch of ``groups`` (:meth:`batches_of_parts`)."""
        import torch

        dev, N = self.device, self.num_nodes
        parts = [(si, c) for grp in groups for si, c in grp]
        part_bounds = np.concatenate([[0], np.cumsum([len(grp) for grp in groups])]).astype(np.int64).tolist()
        centres = [sum(len(c) for _, c in grp) for grp in groups]
        lens = np.fromiter((len(c) for _, c in parts), dtype=np.int64, count=len(parts))
        cen = np.concatenate([c + self.offsets[si] for si, c in parts]) if parts else np.zeros(0, np.int64)
        cen_part = np.repeat(np.arange(len(parts), dtype=np.int64), lens)
        cen_pos = np.arange(len(cen), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        node = torch.from_numpy(cen).to(dev, non_blocking=True)
        part = torch.from_numpy(cen_part).to(dev, non_blocking=True)
        keys = [part * N + node]
        levels = [torch.zeros_like(node)]
        orders = [torch.from_numpy(cen_pos).to(dev, non_blocking=True)]
        present = torch.sort(keys[0]).values
        f_node, f_part = node, part
        for hop in range(1, self.num_hops + 1):
            which, at = self._in_edges(f_node)
            cand = torch.unique(f_part[which] * N + self.csr_src[at])  # sorted by (tile, node)
            new = cand[~_member(cand, present)]
            if new.numel() == 0:
                break
            keys.append(new)
            levels.append(torch.full_like(new, hop))
            orders.append(new % N)
            present = torch.sort(torch.cat([present, new])).values
            f_part, f_node = new // N, new % N
        key = torch.cat(keys)
        level = torch.cat(levels)
        # slots: by tile, then hop, then (centres) tile order / (halo) node id
        slot_order = torch.argsort((key // N * (self.num_hops + 1) + level) * N + torch.cat(orders))
        key, level = key[slot_order], level[slot_order]
        slot_part, slot_node = key // N, key % N
        part_start = torch.zeros(len(parts) + 1, dtype=torch.long, device=dev)
        part_start[1:] = torch.cumsum(torch.bincount(slot_part, minlength=len(parts)), 0)
        # edges: incoming edges of every slot whose source is in the same tile, in edge order per tile
        by_key = torch.argsort(key)
        sorted_key = key[by_key]
        which, at = self._in_edges(slot_node)
        src_key = slot_part[which] * N + self.csr_src[at]
        inside = _member(src_key, sorted_key)
        which, at, src_key = which[inside], at[inside], src_key[inside]
        edge_no = self.csr_edge[at]
        e_order = torch.argsort(slot_part[which] * max(len(self.csr_edge), 1) + edge_no)
        which, src_key, edge_no = which[e_order], src_key[e_order], edge_no[e_order]
        edge_src = by_key[torch.searchsorted(sorted_key, src_key)]
        e_part = slot_part[which]
        edge_part_start = torch.zeros(len(parts) + 1, dtype=torch.long, device=dev)
        edge_part_start[1:] = torch.cumsum(torch.bincount(e_part, minlength=len(parts)), 0)
        starts = torch.stack([part_start, edge_part_start]).cpu().numpy()  # one synchronisation per epoch
        node_start = [int(starts[0][p]) for p in part_bounds]
        edge_start = [int(starts[1][p]) for p in part_bounds]
        centre_slot = torch.nonzero(level == 0).flatten()  # [C] (one more synchronisation of the plan)
        centre_start = np.concatenate([[0], np.cumsum(centres)]).astype(np.int64).tolist()
        return _Plan(slot_node=slot_node, slot_level=level, slot_part=slot_part, edge_src=edge_src, edge_dst=which,
                     edge_row=self.edge_row[edge_no], part_start=part_start, centre_slot=centre_slot,
                     centre_start=centre_start, node_start=node_start,
                     edge_start=edge_start, part_bounds=part_bounds, centres=centres)

    def batch(self, plan: _Plan, b: int) -> "Data":
        """Batch ``b`` of ``plan``: slices and gathers on the device, no synchronisation."""
        from torch_geometric.data import Data

        from gnnst.graph.sampler import _widen

        a, z = plan.node_start[b], plan.node_start[b + 1]
        ea, ez = plan.edge_start[b], plan.edge_start[b + 1]
        pa, pz = plan.part_bounds[b], plan.part_bounds[b + 1]
        nodes = plan.slot_node[a:z]
        slide = self.slide_of[nodes]
        d = Data(x=_widen(self.x[nodes]), pos=self.pos[nodes],
                 edge_index=_stack(plan.edge_src[ea:ez] - a, plan.edge_dst[ea:ez] - a),
                 edge_attr=self.edge_attr[plan.edge_row[ea:ez]], num_nodes=z - a)
        if self.y is not None:
            d.y = _widen(self.y[nodes])
        d.center_mask = plan.slot_level[a:z] == 0
        d.center_index = plan.centre_slot[plan.centre_start[b]:plan.centre_start[b + 1]] - a
        d.node_id = nodes - self.offset_of(slide)
        d.slide = slide
        d.batch = plan.slot_part[a:z] - pa
        d.ptr = plan.part_start[pa:pz + 1] - a
        d.global_node = nodes
        return d

    def offset_of(self, slide: "torch.Tensor") -> "torch.Tensor":
        """First global node of each slide in ``slide``."""
        import torch

        if not hasattr(self, "_offsets_t"):
            self._offsets_t = torch.from_numpy(self.offsets).to(self.device)
        return self._offsets_t[slide]

    def iter_batches(self, groups: list[list[tuple[int, np.ndarray]]]) -> Iterator["Data"]:
        """The batches of ``groups``, planned together, in order."""
        plan = self.plan(groups)
        for b in range(len(groups)):
            yield self.batch(plan, b)


def _member(query: "torch.Tensor", sorted_keys: "torch.Tensor") -> "torch.Tensor":
    """``[Q]`` bool: each of ``query`` is in ``sorted_keys`` (ascending)."""
    import torch

    if sorted_keys.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool)
    i = torch.searchsorted(sorted_keys, query).clamp(max=sorted_keys.numel() - 1)
    return sorted_keys[i] == query


def _stack(src: "torch.Tensor", dst: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.stack([src, dst])
