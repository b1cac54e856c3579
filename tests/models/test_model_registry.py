"""Registry, config validation and import weight."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from gnnst.errors import GnnstError
from gnnst.models import GNNST, ModelConfig, create_model, list_models, register_model


def test_builtin_models_registered():
    assert {"gnnst", "gnnst_mlp", "gnnst_no_contrastive", "gnnst_no_nbhd_scale", "gnnst_masked_recon", "bleep",
            "mclstexp"} <= set(list_models())
    model = create_model("gnnst", in_dim=16, num_genes=8, hidden=32, heads=2)
    assert isinstance(model, GNNST) and model.cfg.hidden == 32 and model.cfg.name == "gnnst"


def test_unknown_model_name_lists_known_names():
    with pytest.raises(GnnstError, match="unknown model name 'nope'.*bleep, gnnst, .*gnnst_mlp, .*mclstexp"):
        create_model("nope", in_dim=16, num_genes=8)


def test_overrides_and_config():
    cfg = ModelConfig(hidden=64, heads=8)
    model = create_model("gnnst_mlp", in_dim=4, num_genes=3, cfg=cfg, dropout=0.0)
    assert model.cfg.hidden == 64 and model.cfg.dropout == 0.0 and model.cfg.name == "gnnst_mlp"
    assert cfg.dropout == 0.1  # the caller's config is not modified
    with pytest.raises(GnnstError, match="model.hiden"):
        create_model("gnnst", in_dim=4, num_genes=3, hiden=3)
    with pytest.raises(GnnstError, match="num_genes"):
        create_model("gnnst", in_dim=4, num_genes=0)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"predict_mode": "nearest"}, "model.predict_mode"),
        ({"hidden": 30, "heads": 4}, "model.heads"),
        ({"blend_alpha": 1.5}, "model.blend_alpha"),
        ({"mask_ratio": 0.0}, "model.mask_ratio"),
        ({"retrieval_k": 0}, "model.retrieval_k"),
        ({"w_recon": -1.0}, "model.w_recon"),
        ({"edge_scale_um": 0.0}, "model.edge_scale_um"),
    ],
)
def test_bad_config_values_name_the_key(kw, key):
    with pytest.raises(GnnstError, match=key):
        ModelConfig(**kw)


def test_config_loader_validates_model_section():
    from gnnst.config import load_config

    assert load_config(overrides=["model.use_graph=false"]).model.use_graph is False
    with pytest.raises(GnnstError, match="model.predict_mode"):
        load_config(overrides=["model.predict_mode=knn"])


def test_register_model_by_name(monkeypatch):
    from gnnst.models import registry

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # keep the toy model out of later tests

    @register_model("test_tiny_linear")
    def _tiny(*, in_dim, num_genes, cfg):
        return nn.Linear(in_dim, num_genes)

    assert "test_tiny_linear" in list_models()
    assert isinstance(create_model("test_tiny_linear", in_dim=2, num_genes=3), nn.Linear)
    with pytest.raises(GnnstError, match="already registered"):
        register_model("test_tiny_linear")(lambda **kw: None)


def test_imports_stay_light():
    code = (
        "import sys, gnnst, gnnst.config, gnnst.metrics; "
        "heavy = [m for m in ('torch', 'torch_geometric', 'gnnst.models.gnnst', 'timm', 'scanpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
