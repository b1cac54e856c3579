"""The one model interface (gnnst.models.base), for EVERY registered model: GNNST, its ablations and the
BLEEP-style and mclSTExp-style comparison models. Shapes, no NaNs, gradients reach every learnable
parameter, prediction after ``after_fit``, and training through the one ``fit``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnnst.models import create_model, list_models
from gnnst.models.base import PREDICTIONS, ExpressionModel

D, G = 16, 8  # widths of the conftest graphs (x and y)
SMALL = dict(hidden=32, proj_dim=16, heads=2, retrieval_k=5)


def build(name: str) -> ExpressionModel:
    torch.manual_seed(0)
    return create_model(name, in_dim=D, num_genes=G, **SMALL)


def test_the_comparison_models_are_registered():
    assert {"bleep", "mclstexp", "gnnst", "gnnst_mlp"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_loss_gradients(name, two_slides):
    model = build(name).train()
    assert isinstance(model, ExpressionModel) and model.cfg.name == name
    assert set(model.prediction_modes) <= set(PREDICTIONS) and model.prediction_modes
    out = model(two_slides)
    N = two_slides.num_nodes
    assert out and all(t.size(0) == N and torch.isfinite(t.float()).all() for t in out.values())
    losses = model.loss(out, two_slides)
    assert "total" in losses and torch.isfinite(losses["total"])
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches: {missing}"


@pytest.mark.parametrize("name", list_models())
def test_predict_after_fit_from_the_image_side(name, make_graph, two_slides):
    model = build(name).eval()
    model.after_fit([make_graph(30, seed=7), make_graph(20, seed=8)], batch_nodes=16)
    del two_slides.y  # prediction never reads the expression
    for mode in (None, *model.prediction_modes):
        p = model.predict(two_slides, mode=mode)
        assert p.shape == (two_slides.num_nodes, G) and torch.isfinite(p).all(), mode


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_through_the_one_fit(name, make_graph, tmp_path):
    """fit() knows a model only through the interface; two epochs move the weights and keep the best."""
    from gnnst.config import load_config
    from gnnst.predictor import predict_graphs
    from gnnst.train.trainer import fit

    cfg = load_config(None, ["train.epochs=2", "train.batch_nodes=16", "train.num_hops=2", "train.warmup_epochs=0"])
    train = [make_graph(36, seed=1), make_graph(30, seed=2)]
    val = [make_graph(25, seed=3)]
    masks = [np.ones(25, dtype=bool)]
    model = build(name)
    before = [p.detach().clone() for p in model.parameters()]
    res = fit(model, train, val, masks, cfg, ckpt_dir=tmp_path / name, device=torch.device("cpu"), progress=False)
    assert res.best_epoch in (0, 1) and len(res.history) == 2 and np.isfinite(res.best_score)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (tmp_path / name / "last.pt").is_file() and (tmp_path / name / "best.pt").is_file()
    (p,) = predict_graphs(model, val, batch_nodes=16, num_hops=2, device="cpu")[None]
    assert p.shape == (25, G) and np.isfinite(p).all()


def test_bank_nodes_is_a_seeded_uniform_sample_of_the_present_spots(make_graph):
    from gnnst.models.retrieval import bank_nodes
    from gnnst.train.prepare import with_node_mask

    a, b = make_graph(30, seed=7), make_graph(20, seed=8)
    keep = np.arange(20) % 3 != 0  # 13 of b's 20 nodes belong to it
    graphs = [a, with_node_mask(b, keep)]
    assert bank_nodes(graphs, None) is None and bank_nodes(graphs, 43) is None  # 30 + 13 spots: all of them
    ids = bank_nodes(graphs, 12)
    assert sum(len(i) for i in ids) == 12 and all(np.all(np.diff(i) > 0) for i in ids)
    assert ids[0].max() < 30 and keep[ids[1]].all()  # only spots that belong to their graph
    assert all(np.array_equal(x, y) for x, y in zip(ids, bank_nodes(graphs, 12)))  # the same at every call
    # uniform over all the spots, not per graph: each of the 43 is drawn about 12/43 of the time
    seen = np.zeros(43)
    from gnnst.models import retrieval

    for seed in range(400):
        retrieval.BANK_SEED, old = seed, retrieval.BANK_SEED
        try:
            i0, i1 = bank_nodes(graphs, 12)
        finally:
            retrieval.BANK_SEED = old
        seen[i0] += 1
        seen[30 + np.searchsorted(np.flatnonzero(keep), i1)] += 1
    assert np.abs(seen / 400 - 12 / 43).max() < 0.12


@pytest.mark.parametrize("name", ["gnnst", "bleep", "mclstexp"])
def test_the_bank_holds_at_most_retrieval_bank_spots(name, make_graph):
    """model.retrieval_bank_spots caps the bank of every model that has one; below the cap the bank is the
    same as without one; the capped bank holds the sampled spots' own expression."""
    from gnnst.models.retrieval import bank_nodes

    graphs = [make_graph(30, seed=7), make_graph(20, seed=8)]
    banks = {}
    for limit in (None, 50, 9):
        torch.manual_seed(0)
        model = create_model(name, in_dim=D, num_genes=G, **SMALL, retrieval_bank_spots=limit).eval()
        model.after_fit(graphs, batch_nodes=16)
        banks[limit] = (model.bank_z.clone(), model.bank_y.clone())
    assert banks[None][0].shape[0] == 50 and banks[9][0].shape == (9, SMALL["proj_dim"])
    assert torch.equal(banks[None][0], banks[50][0]) and torch.equal(banks[None][1], banks[50][1])
    want = torch.cat([g.y[torch.from_numpy(i)] for g, i in zip(graphs, bank_nodes(graphs, 9))])
    assert torch.equal(torch.sort(banks[9][1], dim=0).values, torch.sort(want, dim=0).values)
