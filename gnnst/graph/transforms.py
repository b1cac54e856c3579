"""Spatial graph construction as a PyG ``BaseTransform``."""

from __future__ import annotations

import torch
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from gnnst.graph.edges import graph_from_pos


class SpatialGraph(BaseTransform):
    r"""Set ``edge_index`` and ``edge_attr`` of one slide's ``Data`` from ``pos`` (µm).

    Edges never cross slides: apply it per slide, before batching.

    Args:
        k: each spot receives edges from its ``k`` nearest spots (``None`` = off).
        radius_um: and from every spot closer than this many micrometres (``None`` = off).

    Shapes:
        - **input:** ``data.pos`` ``[N, 2]``
        - **output:** ``data.edge_index`` ``[2, E]`` (row 0 neighbour, row 1 centre),
          ``data.edge_attr`` ``[E, 3]`` (dx, dy, distance in µm)
    """

    def __init__(self, k: int | None = 6, radius_um: float | None = None):
        self.k = k
        self.radius_um = radius_um

    def forward(self, data: Data) -> Data:
        g = graph_from_pos(data.pos.detach().cpu().double().numpy(), k=self.k, radius_um=self.radius_um)
        data.edge_index = torch.from_numpy(g.edge_index)
        data.edge_attr = torch.from_numpy(g.edge_attr)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(k={self.k}, radius_um={self.radius_um})"
