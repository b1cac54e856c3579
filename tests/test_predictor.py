"""TrainedModel, the artefact between training and prediction: save/load round trip, refused files,
prediction (blend of head and retrieval, ensemble mean, members, target scaling undone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnnst.errors import GnnstError

D, G = 16, 8


def _toy_graph(n: int = 30, seed: int = 0):
    from gnnst.graph.edges import graph_from_pos
    from torch_geometric.data import Data

    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 1000, size=(n, 2))
    g = graph_from_pos(pos, k=4, radius_um=None)
    return Data(x=torch.from_numpy(rng.normal(size=(n, D)).astype(np.float32)),
                y=torch.from_numpy(rng.normal(size=(n, G)).astype(np.float32)), pos=torch.from_numpy(pos).float(),
                edge_index=torch.from_numpy(g.edge_index), edge_attr=torch.from_numpy(g.edge_attr), num_nodes=n)


def make_model(name: str = "gnnst", members: int = 2, alpha: float = 0.5):
    from gnnst.config import ExpressionConfig, GraphConfig, ModelConfig
    from gnnst.data.expression import GenePanel
    from gnnst.models import create_model
    from gnnst.predictor import EncoderInfo, TargetScaler, TrainedModel

    genes = [f"G{i}" for i in range(G)]
    mcfg = ModelConfig(name=name, hidden=32, proj_dim=16, heads=2, retrieval_k=5)
    states = []
    for i in range(members):
        torch.manual_seed(i)
        m = create_model(name, in_dim=D, num_genes=G, cfg=mcfg).eval()
        m.after_fit([_toy_graph(40, seed=10 + i)], batch_nodes=16)  # a retrieval bank, where the model has one
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return TrainedModel(model_name=name, model_config=mcfg, in_dim=D, encoder=EncoderInfo("toy", "toy:1", 224, D),
                        patch_size_um=150.0, panel=GenePanel(genes, genes[:3], genes[3:6], ["S1"]),
                        expression=ExpressionConfig(), scaler=TargetScaler(np.arange(G, dtype=np.float32),
                                                                           np.full(G, 2.0, np.float32)),
                        graph=GraphConfig(k=4), batch_nodes=16, num_hops=2, states=states, blend_alpha=alpha,
                        fold={"name": "S2", "train_slides": ["S1"], "test_slides": ["S2"], "patient_disjoint": True})


def test_save_load_round_trip_predicts_the_same(tmp_path):
    from gnnst.predictor import TrainedModel

    tm = make_model()
    tm.cv = {"genes": ["G0"], "pcc_mean": [0.3], "pcc_sd": [None], "n_slides": [1], "pcc_patient_disjoint": [None],
             "definition": "test"}
    path = tm.save(tmp_path / "model.pt")
    back = TrainedModel.load(path)
    assert back.panel == tm.panel and back.model_config == tm.model_config and back.encoder == tm.encoder
    assert back.graph.k == 4 and back.blend_alpha == 0.5 and back.fold == tm.fold and back.cv == tm.cv
    np.testing.assert_array_equal(back.scaler.std, tm.scaler.std)
    g = _toy_graph()
    a, b = tm.predict(g), back.predict(g)
    np.testing.assert_array_equal(a.expression, b.expression)
    # the file is plain data: it loads with weights_only=True (no code runs when a model file is read)
    assert torch.load(path, weights_only=True)["format"] == "gnnst.TrainedModel"


def test_predict_blends_each_member_and_undoes_the_scaling():
    from gnnst.models.base import blend
    from gnnst.predictor import predict_graphs

    tm = make_model(alpha=0.25)
    g = _toy_graph(25, seed=3)
    got = tm.predict([g, _toy_graph(12, seed=4)])
    assert len(got) == 2 and got[0].expression.shape == (25, G) and got[0].members.shape == (2, 25, G)
    want = []
    for model in tm.models():
        out = predict_graphs(model, [g], batch_nodes=16, num_hops=2, device="cpu", modes=("head", "retrieval"))
        want.append(blend(out["head"][0], out["retrieval"][0], 0.25) * tm.scaler.std + tm.scaler.mean)
    np.testing.assert_allclose(got[0].members, np.stack(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0].expression, np.mean(want, 0), rtol=1e-5, atol=1e-5)
    assert tm.predict(g, members=False).members is None


@pytest.mark.parametrize("name, alpha, modes", [("gnnst", 1.0, ("head",)), ("bleep", 0.0, ("retrieval",)),
                                                ("mclstexp", 0.0, ("retrieval",)), ("gnnst", 0.5, ("head", "retrieval"))])
def test_every_model_predicts_through_the_artefact(name, alpha, modes):
    tm = make_model(name, members=1, alpha=alpha)
    assert tm.modes() == modes
    p = tm.predict(_toy_graph(20, seed=5)).expression
    assert p.shape == (20, G) and np.isfinite(p).all()


def test_old_foreign_and_newer_files_are_one_line_errors(tmp_path):
    from gnnst.predictor import TrainedModel

    old = tmp_path / "old.pt"
    torch.save({"model_state": {}, "panel": {}, "scaler": {}}, old)  # a model.pt of gnnst before TrainedModel
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(np.random.default_rng(0), pickled)  # arbitrary objects are never unpickled
    text = tmp_path / "text.pt"
    text.write_text("hello")
    newer = tmp_path / "newer.pt"
    d = make_model().to_dict()
    d["format_version"] = 99
    torch.save(d, newer)
    cases = {old: "a model.pt of an older gnnst (no 'format' field", foreign: "not a gnnst model file (no 'format'",
             pickled: "not a gnnst model file (cannot read it", text: "not a gnnst model file (cannot read it",
             newer: "format version 99, this gnnst reads version 1; upgrade gnnst",
             tmp_path / "absent.pt": "model file not found"}
    for path, msg in cases.items():
        with pytest.raises(GnnstError) as e:
            TrainedModel.load(path)
        assert msg in str(e.value) and str(path.name) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_inconsistent_parts_are_refused(tmp_path):
    from gnnst.predictor import TrainedModel

    d = make_model().to_dict()
    d["scaler"]["mean"] = d["scaler"]["mean"][:-1]
    torch.save(d, tmp_path / "m.pt")
    with pytest.raises(GnnstError, match="m.pt: 'scaler.mean' has 7 values for a panel of 8 genes"):
        TrainedModel.load(tmp_path / "m.pt")
    d = make_model().to_dict()
    d["model_config"]["hidden"] = 0
    torch.save(d, tmp_path / "m.pt")
    with pytest.raises(GnnstError, match="m.pt: config key 'model.hidden'"):
        TrainedModel.load(tmp_path / "m.pt")
    with pytest.raises(GnnstError, match="embedding width mismatch"):
        g = _toy_graph()
        g.x = g.x[:, :5]
        make_model().predict(g)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_scaler_fit_parts_equals_fit_on_the_concatenation_bit_for_bit(dtype):
    from gnnst.predictor import TargetScaler

    rng = np.random.default_rng(0)
    for trial in range(6):
        g = int(rng.integers(1, 300))
        parts = [(rng.normal(size=(int(rng.integers(0, 4000)), g)) * rng.uniform(0.1, 50) + rng.uniform(-5, 100))
                 .astype(dtype) for _ in range(int(rng.integers(1, 5)))]
        parts[0] = np.concatenate([parts[0], np.zeros((3, g), dtype)])  # a constant run: std floored alike
        ref = TargetScaler.fit(np.concatenate(parts))
        for chunk in (1, 7, 1000, 65536):
            got = TargetScaler.fit_parts(lambda: parts, chunk_rows=chunk)
            assert np.array_equal(got.mean, ref.mean) and np.array_equal(got.std, ref.std), (trial, chunk)
