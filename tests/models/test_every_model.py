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
