"""The BLEEP-style retrieval baseline: shapes, no NaNs, gradients, retrieval, loss targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gnnst.errors import GnnstError
from gnnst.models import ModelConfig
from gnnst.models.bleep import BLEEP
from gnnst.models.retrieval import retrieve_topk

D, G = 16, 8  # widths of the conftest graphs (x and y)


def build(**kw) -> BLEEP:
    torch.manual_seed(0)
    return BLEEP(D, G, ModelConfig(name="bleep", hidden=32, proj_dim=16, heads=2, **kw))


def test_shapes_nans_and_gradients(two_slides):
    model = build().train()
    out = model(two_slides)
    N = two_slides.num_nodes
    assert set(out) == {"z_img", "z_gene"}
    assert out["z_img"].shape == out["z_gene"].shape == (N, 16)
    assert all(torch.isfinite(t).all() for t in out.values())
    loss = model.loss(out, two_slides)["total"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches: {missing}"


def test_loss_uses_centre_spots_only(graph):
    model = build(dropout=0.0, input_dropout=0.0).eval()
    out = model(graph)
    halo_moved = graph.clone()
    halo_moved.y = graph.y.clone()
    halo_moved.y[~graph.center_mask] += 5.0
    torch.testing.assert_close(model.loss(model(halo_moved), halo_moved)["total"], model.loss(out, graph)["total"])


def test_retrieval_averages_top_k_equally(graph):
    model = build(retrieval_k=3).eval()
    with pytest.raises(GnnstError, match="no retrieval bank"):
        model.predict(graph)
    model.build_retrieval_bank(graph.y)
    assert model.has_retrieval_bank and model.bank_y.shape == (graph.num_nodes, G)
    pred = model.predict(graph)
    assert pred.shape == (graph.num_nodes, G) and torch.isfinite(pred).all()
    z = model.encode_image(graph.x)
    top = (z @ model.bank_z.T).topk(3, dim=1).indices
    torch.testing.assert_close(pred, graph.y[top].mean(1))
    with pytest.raises(GnnstError, match="retrieval"):
        model.predict(graph, mode="head")


def test_bank_from_batches_equals_bank_from_tensor_and_survives_state_dict(two_slides):
    model = build().eval()
    model.build_retrieval_bank([two_slides])
    z_batches = model.bank_z.clone()
    model.build_retrieval_bank(two_slides.y[two_slides.center_mask])
    torch.testing.assert_close(model.bank_z, z_batches)
    fresh = build().eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.predict(two_slides), model.predict(two_slides))


def test_inverse_distance_weights_favour_the_nearest():
    bank_z = F.normalize(torch.eye(3), dim=-1)
    bank_y = torch.tensor([[1.0], [0.0], [0.0]])
    q = F.normalize(torch.tensor([[1.0, 0.2, 0.0]]), dim=-1)
    mean = retrieve_topk(q, bank_z, bank_y, k=2, weights="mean")
    inv = retrieve_topk(q, bank_z, bank_y, k=2, weights="inverse_distance")
    torch.testing.assert_close(mean, torch.tensor([[0.5]]))
    assert inv.item() > 0.5


def test_bad_inputs_raise(graph):
    model = build()
    bad = graph.clone()
    bad.x = bad.x[:, :5]
    with pytest.raises(GnnstError, match="batch.x"):
        model(bad)
    bad = graph.clone()
    bad.y = bad.y[:, :3]
    with pytest.raises(GnnstError, match="batch.y"):
        model(bad)
