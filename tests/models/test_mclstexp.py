"""The mclSTExp-style retrieval baseline: shapes, no NaNs, gradients, sentences, retrieval."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from gnnst.errors import GnnstError
from gnnst.models import ModelConfig
from gnnst.models.mclstexp import MclSTExp

D, G = 16, 8  # widths of the conftest graphs (x and y)


def build(**kw) -> MclSTExp:
    torch.manual_seed(0)
    return MclSTExp(D, G, ModelConfig(name="mclstexp", hidden=32, proj_dim=16, heads=2, **kw))


def test_shapes_nans_and_gradients(two_slides):
    model = build().train()
    out = model(two_slides)
    N = two_slides.num_nodes
    assert set(out) == {"z_img", "z_gene"}
    assert out["z_img"].shape == out["z_gene"].shape == (N, 16)
    for t in out.values():
        assert torch.isfinite(t).all()
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(N))
    loss = model.loss(out, two_slides)["total"]
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches: {missing}"


def test_slides_of_a_batch_are_separate_sentences(make_graph):
    model = build(dropout=0.0, input_dropout=0.0).eval()
    a, b = make_graph(20, seed=1), make_graph(15, seed=2)
    alone = model(a)["z_gene"]
    together = model(Batch.from_data_list([a, b]))["z_gene"][:20]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    # within a sentence the spots do attend to one another
    a2 = a.clone()
    a2.y = a.y.clone()
    a2.y[5:] += 1.0
    assert not torch.allclose(model(a2)["z_gene"][:5], alone[:5])


def test_positions_matter_and_are_translation_invariant(graph):
    model = build(dropout=0.0, input_dropout=0.0).eval()
    z = model(graph)["z_gene"]
    shifted = graph.clone()
    shifted.pos = graph.pos + 1000.0
    torch.testing.assert_close(model(shifted)["z_gene"], z, atol=1e-5, rtol=1e-4)
    stretched = graph.clone()
    stretched.pos = graph.pos * 3.0
    assert not torch.allclose(model(stretched)["z_gene"], z)


def test_retrieval_from_batches(two_slides):
    model = build(retrieval_k=4).eval()
    with pytest.raises(GnnstError, match="no retrieval bank"):
        model.predict(two_slides)
    with pytest.raises(GnnstError, match="positions"):
        model.build_retrieval_bank(two_slides.y)
    model.build_retrieval_bank([two_slides])
    n_centre = int(two_slides.center_mask.sum())
    assert model.bank_z.shape == (n_centre, 16)
    pred = model.predict(two_slides)
    y_c = two_slides.y[two_slides.center_mask]
    assert pred.shape == (two_slides.num_nodes, G) and torch.isfinite(pred).all()
    assert (pred <= y_c.max(0).values + 1e-5).all() and (pred >= y_c.min(0).values - 1e-5).all()
    fresh = build(retrieval_k=4).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.predict(two_slides), pred)


def test_missing_pos_raises(graph):
    model = build()
    graph.pos = None
    with pytest.raises(GnnstError, match="batch.pos"):
        model(graph)
