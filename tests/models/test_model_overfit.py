"""Smoke test: the model overfits a tiny graph on CPU in seconds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gnnst.models import compute_losses, create_model

D, G = 16, 8  # widths of the conftest graphs (x and y)


def test_overfits_tiny_graph(make_graph):
    torch.manual_seed(0)
    graph = make_graph(60, k=4, seed=7, halo=0.0)  # y depends on the spot and its neighbours
    model = create_model(
        "gnnst", in_dim=D, num_genes=G, hidden=64, proj_dim=32, heads=4, dropout=0.0, input_dropout=0.0
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def mse() -> float:
        model.eval()
        with torch.no_grad():
            return F.mse_loss(model.predict(graph, mode="head"), graph.y).item()

    initial = mse()
    for _ in range(100):
        model.train()
        opt.zero_grad()
        compute_losses(model, model(graph), graph)["total"].backward()
        opt.step()
    final = mse()
    assert final < 0.1 * initial, (initial, final)

    # a bank of the training spots retrieves them back
    model.eval()
    model.build_retrieval_bank(graph.y)
    retrieved = model.predict(graph, mode="retrieval")
    assert F.mse_loss(retrieved, graph.y).item() < 0.5 * initial
