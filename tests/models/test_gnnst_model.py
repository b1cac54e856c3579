"""GNNST and its registered ablations: outputs per switch, shapes, no NaNs, gradients, invariants, retrieval.
(The interface every registered model shares is tested in test_every_model.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.data import Data

from gnnst.errors import GnnstError
from gnnst.models import GNNST, ModelConfig, compute_losses, create_model, list_models

D, G = 16, 8  # widths of the conftest graphs (x and y)
SMALL = dict(hidden=32, proj_dim=16, heads=2)  # keeps every test fast
GNNST_NAMES = [n for n in list_models() if n.startswith("gnnst")]  # GNNST and its registered ablations

ABLATIONS = {
    "default": {},
    "no_graph": {"use_graph": False},
    "no_contrastive": {"use_contrastive": False},
    "no_nbhd_scale": {"use_neighbourhood_scale": False},
    "masked_recon": {"use_masked_recon": True},
    "recon_only": {"use_masked_recon": True, "use_contrastive": False},
    "one_layer": {"num_layers": 1},
    "three_layers": {"num_layers": 3},
}


def build(name: str = "gnnst", **overrides) -> GNNST:
    torch.manual_seed(0)
    return create_model(name, in_dim=D, num_genes=G, **{**SMALL, **overrides})


def expected_keys(cfg: ModelConfig, with_y: bool) -> set[str]:
    keys = {"y_hat"}
    nbhd = cfg.use_graph and cfg.use_contrastive and cfg.use_neighbourhood_scale
    if cfg.use_contrastive:
        keys |= {"z_img"} | ({"z_gene"} if with_y else set())
    if nbhd:
        keys |= {"z_img_nb"} | ({"z_gene_nb"} if with_y else set())
    if cfg.use_masked_recon and with_y:
        keys |= {"y_rec", "recon_mask"}
    return keys


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
@pytest.mark.parametrize("name", GNNST_NAMES)
def test_shapes_nans_and_gradients(name, ablation, two_slides):
    model = build(name, **ABLATIONS[ablation])
    model.train()
    out = model(two_slides)
    N = two_slides.num_nodes
    assert set(out) == expected_keys(model.cfg, with_y=True)
    for key, t in out.items():
        assert t.size(0) == N, key
        assert torch.isfinite(t.float()).all(), key
    assert out["y_hat"].shape == (N, G)
    for key in ("z_img", "z_gene", "z_img_nb", "z_gene_nb"):
        if key in out:
            assert out[key].shape == (N, SMALL["proj_dim"])
            torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(N))

    losses = compute_losses(model, out, two_slides)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    # switched-off components are never built, so every parameter must learn
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches: {missing}"


@pytest.mark.parametrize("name", GNNST_NAMES)
def test_no_y_at_inference(name, two_slides):
    model = build(name).eval()
    del two_slides.y
    out = model(two_slides)
    assert set(out) == expected_keys(model.cfg, with_y=False)
    assert model.predict(two_slides, mode="head").shape == (two_slides.num_nodes, G)


def test_ablation_switches_remove_modules():
    assert build(use_graph=False).img_neighbour is None
    assert build("gnnst_mlp").img_neighbour is None
    assert build("gnnst_mlp").cfg.use_graph is False
    m = build(use_contrastive=False)
    assert m.gene_encoder is None and m.proj_img is None and m.logit_scale is None
    m = build(use_neighbourhood_scale=False)
    assert m.gene_neighbour is None and m.proj_img_nb is None and m.img_neighbour is not None
    assert build().recon_decoder is None
    assert math.isclose(build().logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_neighbour_branch_reaches_prediction(graph):
    j, c = graph.edge_index[:, 0].tolist()  # j is a neighbour of centre c
    moved = graph.clone()
    moved.x[j] = torch.randn(D)
    graph_model, spot_model = build().eval(), build("gnnst_mlp").eval()
    assert not torch.allclose(graph_model.predict(moved, mode="head")[c], graph_model.predict(graph, mode="head")[c])
    torch.testing.assert_close(spot_model.predict(moved, mode="head")[c], spot_model.predict(graph, mode="head")[c])


@pytest.mark.parametrize("name", GNNST_NAMES)
def test_permutation_equivariance(name, graph):
    model = build(name).eval()
    model.after_fit([graph], batch_nodes=64)  # the retrieval bank, for the models that have one
    perm = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(3))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    permuted = Data(
        x=graph.x[perm],
        y=graph.y[perm],
        edge_index=inv[graph.edge_index],  # old node i is new node inv[i]
        edge_attr=graph.edge_attr,
        num_nodes=graph.num_nodes,
    )
    out, out_p = model(graph), model(permuted)
    torch.testing.assert_close(out_p["y_hat"], out["y_hat"][perm], atol=1e-5, rtol=1e-4)
    if "z_img" in out:
        torch.testing.assert_close(out_p["z_img"], out["z_img"][perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.predict(permuted), model.predict(graph)[perm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", GNNST_NAMES)
def test_isolated_nodes_and_zero_edges(name, make_graph):
    model = build(name)
    g = make_graph(12, seed=5)
    keep = (g.edge_index[1] < 6) & (g.edge_index[0] < 6)  # nodes 6..11 lose every edge
    partial = g.clone()
    partial.edge_index, partial.edge_attr = g.edge_index[:, keep], g.edge_attr[keep]
    empty = g.clone()
    empty.edge_index, empty.edge_attr = g.edge_index[:, :0], g.edge_attr[:0]
    no_attr = Data(x=g.x, y=g.y, edge_index=g.edge_index[:, :0], num_nodes=12)
    for batch in (partial, empty, no_attr):
        model.train()
        out = model(batch)
        assert all(torch.isfinite(t.float()).all() for t in out.values())
        loss = compute_losses(model, out, batch)["total"]
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.eval()
        assert torch.isfinite(model.predict(batch, mode="head")).all()


def test_retrieval_k1_returns_nearest_bank_entry(graph):
    model = build(retrieval_k=1).eval()
    gen = torch.Generator().manual_seed(0)
    bank_z = torch.nn.functional.normalize(torch.randn(20, SMALL["proj_dim"], generator=gen), dim=-1)
    bank_y = torch.randn(20, G, generator=gen)
    model.set_retrieval_bank(bank_z, bank_y)
    # queries near known entries
    pick = torch.tensor([3, 0, 19, 7])
    query = bank_z[pick] + 0.01 * torch.randn(4, SMALL["proj_dim"], generator=gen)
    torch.testing.assert_close(model.retrieve(query), bank_y[pick])
    # through predict: the nearest entry to each spot's own z_img
    z_img = model(graph)["z_img"]
    nearest = (z_img @ bank_z.T).argmax(dim=1)
    torch.testing.assert_close(model.predict(graph, mode="retrieval"), bank_y[nearest])
    # blend = alpha * head + (1 - alpha) * retrieval
    a = model.cfg.blend_alpha
    expected = a * model.predict(graph, mode="head") + (1 - a) * bank_y[nearest]
    torch.testing.assert_close(model.predict(graph), expected)


def test_retrieval_topk_is_a_convex_combination(graph):
    model = build(retrieval_k=5).eval()
    model.build_retrieval_bank(graph.y)
    pred = model.predict(graph, mode="retrieval")
    assert pred.shape == (graph.num_nodes, G)
    assert (pred <= graph.y.max(0).values + 1e-5).all() and (pred >= graph.y.min(0).values - 1e-5).all()
    torch.testing.assert_close(model.bank_z, model.encode_genes(graph.y))


def test_retrieval_bank_errors_and_fallbacks(graph):
    model = build().eval()
    with pytest.raises(GnnstError, match="no retrieval bank"):
        model.predict(graph)  # default mode "blend" needs a bank
    with pytest.raises(GnnstError, match="mode"):
        model.predict(graph, mode="nearest")
    with pytest.raises(GnnstError, match="z_gene_bank"):
        model.set_retrieval_bank(torch.zeros(4, 3), torch.zeros(4, G))
    with pytest.raises(GnnstError, match="y_bank"):
        model.set_retrieval_bank(torch.zeros(4, SMALL["proj_dim"]), torch.zeros(5, G))
    plain = build(use_contrastive=False).eval()
    torch.testing.assert_close(plain.predict(graph), plain.predict(graph, mode="head"))  # documented fallback
    with pytest.raises(GnnstError, match="use_contrastive"):
        plain.predict(graph, mode="retrieval")
    with pytest.raises(GnnstError, match="use_contrastive"):
        plain.encode_genes(graph.y)


def test_bank_is_saved_in_state_dict(graph):
    model = build().eval()
    model.build_retrieval_bank(graph.y)
    state = model.state_dict()
    assert state["bank_z"].shape == (graph.num_nodes, SMALL["proj_dim"])
    fresh = build().eval()
    fresh.load_state_dict(state)
    assert fresh.has_retrieval_bank
    torch.testing.assert_close(fresh.predict(graph), model.predict(graph))


def test_bad_inputs_raise_gnnst_error(graph):
    model = build()
    bad_x = graph.clone()
    bad_x.x = bad_x.x[:, :5]
    with pytest.raises(GnnstError, match="batch.x"):
        model(bad_x)
    bad_y = graph.clone()
    bad_y.y = bad_y.y[:, :3]
    with pytest.raises(GnnstError, match="batch.y"):
        model(bad_y)
    bad_e = graph.clone()
    bad_e.edge_attr = bad_e.edge_attr[:, :2]
    with pytest.raises(GnnstError, match="edge_attr"):
        model(bad_e)


def test_eval_is_deterministic_and_edge_scale_matters(graph):
    model = build().eval()
    torch.testing.assert_close(model(graph)["y_hat"], model(graph)["y_hat"])
    other = build(edge_scale_um=20.0).eval()
    assert not torch.allclose(other(graph)["y_hat"], model(graph)["y_hat"])


def test_reset_parameters_restores_logit_scale():
    model = build(use_masked_recon=True)
    with torch.no_grad():
        model.logit_scale.fill_(0.0)
        model.mask_token.fill_(1.0)
    before = model.head.fc1.weight.clone()
    model.reset_parameters()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert model.mask_token.abs().sum() == 0
    assert not torch.equal(before, model.head.fc1.weight)
