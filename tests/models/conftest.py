"""Tiny seeded spot graphs built by hand (kNN with scipy's cKDTree), for the model tests.

Shared as fixtures only (no ``from conftest import``), so any pytest import mode works.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from torch_geometric.data import Batch, Data

D, G = 16, 8  # patch-embedding width and gene-panel size of the toy graphs (the tests repeat them)


def knn_edges(pos: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN graph: row 0 neighbour (source), row 1 centre (target); attr (dx, dy, dist) in µm."""
    _, nbr = cKDTree(pos).query(pos, k=k + 1)  # [N, k + 1], column 0 is the spot itself
    dst = np.repeat(np.arange(len(pos)), k)
    src = nbr[:, 1:].reshape(-1)
    off = pos[src] - pos[dst]  # source minus target
    attr = np.concatenate([off, np.linalg.norm(off, axis=1, keepdims=True)], axis=1)
    edge_index = torch.from_numpy(np.stack([src, dst])).long()
    return edge_index, torch.from_numpy(attr).float()


def make_graph(n: int = 40, *, k: int = 4, seed: int = 0, with_y: bool = True, halo: float = 0.3) -> Data:
    """One toy slide: spots on a jittered 100 µm grid, x random, y depending on x and neighbours."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
    pos = grid * 100.0 + rng.normal(0, 10.0, size=(n, 2))
    edge_index, edge_attr = knn_edges(pos, k)
    x = torch.from_numpy(rng.normal(size=(n, D))).float()
    data = Data(x=x, edge_index=edge_index, edge_attr=edge_attr, pos=torch.from_numpy(pos).float(), num_nodes=n)
    if with_y:
        w_self = torch.from_numpy(np.random.default_rng(123).normal(size=(D, G)) / np.sqrt(D)).float()
        w_nb = torch.from_numpy(np.random.default_rng(456).normal(size=(D, G)) / np.sqrt(D)).float()
        nb_mean = torch.zeros(n, D).index_add_(0, edge_index[1], x[edge_index[0]]) / k
        data.y = torch.tanh(x @ w_self + nb_mean @ w_nb)
    data.center_mask = torch.from_numpy(rng.random(n) >= halo)
    return data


@pytest.fixture(name="make_graph")
def make_graph_fixture():
    """The graph factory itself: ``make_graph(n, k=..., seed=..., with_y=..., halo=...)``."""
    return make_graph


@pytest.fixture
def graph() -> Data:
    return make_graph()


@pytest.fixture
def two_slides() -> Batch:
    """Two slides batched (block-diagonal edges) with halo nodes."""
    return Batch.from_data_list([make_graph(30, seed=1), make_graph(25, seed=2)])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy machine's contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
