"""`gnnst train` end to end on tiny generated slides: outputs, resume, bad input."""

import json

import anndata as ad
import numpy as np
import pytest

from gnnst.cli import main
from gnnst_testdata import write_legacy_slide, write_manifest

TINY = ["train.epochs=3", "train.num_threads=1", "encoder.num_threads=1", "eval.figures=false", "train.ensemble=2", "train.patience=10",
        "model.hidden=32", "model.proj_dim=16", "model.heads=2", "expression.n_top_expressed=6", "expression.n_top_variable=6", "eval.n_heg=3",
        "eval.n_hvg=3", "train.val_fraction=0.25", "train.batch_nodes=16"]


@pytest.fixture
def three_patients(tmp_path):
    root = tmp_path / "data"
    for i, s in enumerate(["S1", "S2", "S3"]):
        write_legacy_slide(root, s, seed=i, grid=(5, 4), image_size=(260, 220))
    m = write_manifest(tmp_path / "m.yaml", {"S1": "P1", "S2": "P2", "S3": "P3"})
    return {"root": root, "manifest": m, "cache": tmp_path / "cache", "tmp": tmp_path}


def _train(ds, out, *extra):
    return main(["train", "--manifest", str(ds["manifest"]), "--data-root", str(ds["root"]), "--cache-dir",
                 str(ds["cache"]), "--out", str(out), "--quiet", *TINY, *extra])


def test_train_outputs(three_patients, capsys):
    out = three_patients["tmp"] / "run"
    assert _train(three_patients, out) == 0
    printed = capsys.readouterr().out
    assert "gnnst, all folds" in printed and "ridge, all folds" in printed
    assert "ridge + neighbour mean, all folds" in printed and "PCC HEG3/slide" in printed  # labels carry eval.n_heg
    m = json.loads((out / "metrics.json").read_text())
    from gnnst.metrics import ALL_KEYS

    for k in ALL_KEYS:
        assert np.isfinite(m["summary"][k]), k
        assert k in m["baselines"]["ridge"] and k in m["baselines"]["ridge_neighbours"]
        assert m["definitions"]["metrics"][k]["definition"]  # every figure states its definition
    assert m["protocol"] == "honest" and m["definitions"]["hvg"] == "seurat"
    assert m["summary"]["n_genes_pooled"]["all"] >= 1
    assert len(m["folds"]) == 3  # three patients: leave one patient out
    for f in m["folds"]:
        assert f["patient_disjoint"] is True and len(f["test_slides"]) == 1
        assert f["test_slides"][0] not in f["train_slides"]
        assert set(f["genes"]["heg"]) <= set(f["genes"]["all"]) and len(f["genes"]["heg"]) == 3
        assert f["blend_alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    for s in ("S1", "S2", "S3"):
        a = ad.read_h5ad(out / "predictions" / f"{s}.h5ad")
        assert a.n_obs == 20 and a.layers["gnnst_pred"].shape == a.X.shape
        assert a.obsm["spatial"].shape == (20, 2) and (a.obs["slide_id"] == s).all()
        assert np.isfinite(a.layers["gnnst_pred"]).all()
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    assert (out / "folds" / "patient_P1" / "model.pt").is_file()
    assert (out / "folds" / "patient_P1" / "member0" / "last.pt").is_file()
    # the final model: trained on all three slides, for `gnnst predict`
    from gnnst.predictor import TrainedModel

    final = TrainedModel.load(out / "final" / "model.pt")
    assert final.fold["name"] == "final" and final.fold["train_slides"] == ["S1", "S2", "S3"]
    assert final.fold["test_slides"] == [] and len(final.states) == 2
    # the final model carries the run's per-gene cross-validated PCC, from the folds' held-out slides
    cv = final.cv
    assert cv is not None and cv["genes"] == final.panel.genes == list(final.panel.genes)
    assert len(cv["pcc_mean"]) == len(cv["n_slides"]) == len(final.panel.genes)
    g0 = next(g for g, n in zip(cv["genes"], cv["n_slides"]) if n > 0)
    i0 = cv["genes"].index(g0)
    held = [v["pcc_per_gene"][f["genes"]["all"].index(g0)] for f in m["folds"] if g0 in f["genes"]["all"]
            for v in f["per_slide"].values()]
    held = [r for r in held if r is not None]
    assert cv["n_slides"][i0] == len(held) and cv["pcc_mean"][i0] == pytest.approx(np.mean(held))
    fold_model = TrainedModel.load(out / "folds" / "patient_P1" / "model.pt")
    assert fold_model.fold["train_slides"] == ["S2", "S3"]  # the folds' models never saw their test slide
    assert fold_model.cv is None
    rc = main(["predict", "--checkpoint", str(out / "final" / "model.pt"), "--image",
               str(three_patients["root"] / "S1_HE.jpg"), "--spots", str(three_patients["root"] / "S1_selection.tsv"),
               "--out", str(out / "s1_final.h5ad"), "--cache-dir", str(three_patients["cache"]), "--quiet"])
    assert rc == 0 and ad.read_h5ad(out / "s1_final.h5ad").n_vars == len(final.panel.genes)
    _check_reliability(out, m, final, fold_model, capsys, printed)


def _check_reliability(out, m, final, fold_model, capsys, summary: str):
    """What says how far to trust the predictions (gnnst.reliability), fitted on training slides only."""
    from gnnst.metrics import RELIABILITY_COLUMNS

    # each fold model: the spread's scale from its validation spots, an OOD reference of its training slides
    assert fold_model.calibration.members == 2 and fold_model.calibration.level == 0.9
    assert fold_model.ood_reference.n_train == 40  # S2 + S3, 20 spots each: never the held-out S1
    rel = m["reliability"]
    for s in ("S1", "S2", "S3"):
        v = rel["per_slide"][s]
        assert set(v) == set(RELIABILITY_COLUMNS) and 0 <= v["interval_coverage"] <= 1 and 0 <= v["ood_fraction"] <= 1
        assert -1 <= v["sd_error_spearman"] <= 1
    assert rel["summary"]["slides"] == 3 and rel["definitions"]["interval_coverage"]["label"] == "coverage (nominal 0.9)"
    assert rel["spread_scale"]["patient_P1"] == pytest.approx(fold_model.calibration.scale)
    assert rel["final_model_genes"]["n_genes"] == len(final.panel.genes)
    assert "Spearman(abs err, sd)" in summary and "Final model:" in summary  # printed with the summary
    # a held-out slide's prediction file: the fold model's spread and flags, no reliability of its own genes
    a = ad.read_h5ad(out / "predictions" / "S1.h5ad")
    assert a.layers["gnnst_sd"].shape == a.X.shape and (a.layers["gnnst_sd"] >= 0).all()
    assert a.obs["gnnst_ood"].dtype == bool and np.isfinite(a.obs["gnnst_ood_score"]).all()
    assert a.obs["gnnst_ood"].mean() == pytest.approx(rel["per_slide"]["S1"]["ood_fraction"])
    assert a.var["gnnst_cv_pcc"].isna().all() and not a.var["gnnst_reliable"].any()
    assert "fold model 'patient_P1'" in a.uns["gnnst"]["reliability"]["genes"]["source"]
    # the final model's predictions: its cross-validated PCC in var, the gene count printed
    rc = main(["predict", "--checkpoint", str(out / "final" / "model.pt"), "--image", str(out.parent / "data" / "S2_HE.jpg"),
               "--spots", str(out.parent / "data" / "S2_selection.tsv"), "--out", str(out / "s2.h5ad"),
               "--cache-dir", str(out.parent / "cache"), "--quiet", "--reliable-pcc", "-1"])
    printed = capsys.readouterr().out
    p = ad.read_h5ad(out / "s2.h5ad")
    cv = dict(zip(final.cv["genes"], final.cv["pcc_mean"]))
    expect = np.array([np.nan if cv[g] is None else cv[g] for g in p.var_names], dtype=np.float32)
    np.testing.assert_allclose(p.var["gnnst_cv_pcc"].to_numpy(), expect)
    n = int(np.isfinite(expect).sum())  # threshold -1: every gene with an estimate passes
    assert rc == 0 and int(p.var["gnnst_reliable"].sum()) == n
    assert f"{n} of {p.n_vars} genes pass the reliability threshold (cross-validated PCC >= -1" in printed


def test_crossval_scores_through_the_saved_fold_model(three_patients):
    """A fold's held-out predictions are TrainedModel.predict of the saved folds/<fold>/model.pt on the
    slide's graph: the metrics of a fold and `gnnst predict` run the same code."""
    from gnnst import keys
    from gnnst.graph.dataset import slide_to_data
    from gnnst.predictions import encoder_key
    from gnnst.predictor import TrainedModel

    out = three_patients["tmp"] / "run1"
    assert _train(three_patients, out, "eval.final_model=false", "eval.only_folds=[S2]") == 0
    model = TrainedModel.load(out / "folds" / "patient_P2" / "model.pt")
    a = ad.read_h5ad(out / "predictions" / "S2.h5ad")
    assert a.uns[keys.UNS_GNNST]["model"]["fold"] == "patient_P2"
    g = slide_to_data(a, a.obsm[encoder_key(model.encoder.name)], None, k=model.graph.k,
                      radius_um=model.graph.radius_um)
    got = model.predict(g)
    np.testing.assert_array_equal(got.expression, a.layers["gnnst_pred"])
    assert got.members.shape == (2, a.n_obs, a.n_vars)  # train.ensemble=2
    np.testing.assert_allclose(got.members.mean(0), got.expression, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("every_s, cut_at", [
    ("0", 8),  # checkpoints every epoch; 3 epochs x 2 members per fold: second fold, first member, mid-training
    ("3600", 3),  # as by default on a short fit: only after a member's last epoch; fold 2's member 1 starts over
])
def test_resume_reproduces_uninterrupted_run(three_patients, monkeypatch, every_s, cut_at):
    ds = three_patients
    assert _train(ds, ds["tmp"] / "full") == 0
    full = json.loads((ds["tmp"] / "full" / "metrics.json").read_text())

    import gnnst.io

    real_save, calls = gnnst.io.atomic_torch_save, {"n": 0, "epochs": []}

    def interrupt_after_some_epochs(obj, path):
        real_save(obj, path)
        if str(path).endswith("last.pt"):
            calls["n"] += 1
            calls["epochs"].append(obj["epoch"])
            if calls["n"] == cut_at:
                raise KeyboardInterrupt

    cut = ds["tmp"] / f"cut{every_s}"
    monkeypatch.setattr(gnnst.io, "atomic_torch_save", interrupt_after_some_epochs)
    assert _train(ds, cut, f"train.checkpoint_every_s={every_s}") == 130
    assert calls["epochs"] == (([0, 1, 2] * 3)[:cut_at] if every_s == "0" else [2] * cut_at)  # when last.pt was written
    assert not (cut / "metrics.json").exists()
    monkeypatch.setattr(gnnst.io, "atomic_torch_save", real_save)
    assert _train(ds, cut, "--resume") == 0  # the interval is result-neutral: the default may resume
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["summary"] == full["summary"]
    assert [f["val_pcc_members"] for f in resumed["folds"]] == [f["val_pcc_members"] for f in full["folds"]]
    assert [f["best_epochs"] for f in resumed["folds"]] == [f["best_epochs"] for f in full["folds"]]


@pytest.mark.parametrize("case, pattern", [
    ("unknown_key", "unknown config key 'train.lrr'"),
    ("unknown_fold", "unknown fold 'nope'"),
])
def test_train_bad_input(three_patients, capsys, case, pattern):
    extra = {"unknown_key": ["train.lrr=1"], "unknown_fold": ["eval.only_folds=[nope]"]}[case]
    assert _train(three_patients, three_patients["tmp"] / "bad", *extra) == 2
    assert pattern in capsys.readouterr().err


def test_half_storage_trains_like_float32(three_patients):
    """graph.storage=float16 (the default above 200,000 spots) keeps x and y in half the memory; the loader
    widens each batch, so training runs and lands near the float32 run (inputs rounded to ~3 digits)."""
    import torch

    from gnnst.graph.dataset import HALF_STORAGE_ABOVE, storage_dtype

    assert storage_dtype(HALF_STORAGE_ABOVE, "auto") == torch.float32
    assert storage_dtype(HALF_STORAGE_ABOVE + 1, "auto") == torch.float16
    assert storage_dtype(10, "float16") == torch.float16
    ds = three_patients
    assert _train(ds, ds["tmp"] / "f32", "graph.storage=float32", "train.ensemble=1", "eval.baselines=[]") == 0
    assert _train(ds, ds["tmp"] / "f16", "graph.storage=float16", "train.ensemble=1", "eval.baselines=[]") == 0
    a = ad.read_h5ad(ds["tmp"] / "f32" / "predictions" / "S1.h5ad").layers["gnnst_pred"]
    b = ad.read_h5ad(ds["tmp"] / "f16" / "predictions" / "S1.h5ad").layers["gnnst_pred"]
    assert np.isfinite(b).all() and not np.array_equal(a, b)  # the half run really ran on rounded inputs
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_train_a_comparison_model_from_the_command_line(three_patients, capsys):
    """`gnnst train model.name=bleep`: the BLEEP-style model trains in the one loop, is scored like any
    model, and its model.pt predicts new slides."""
    from gnnst.predictor import TrainedModel

    out = three_patients["tmp"] / "bleep"
    assert _train(three_patients, out, "model.name=bleep", "train.ensemble=1", "eval.baselines=[]", "eval.only_folds=[S1]",
                  "model.retrieval_k=5") == 0
    assert "| bleep, all folds |" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "bleep" and np.isfinite(m["summary"]["pcc_all_per_slide"])
    final = TrainedModel.load(out / "final" / "model.pt")
    assert final.model_name == "bleep" and final.blend_alpha == 0.0 and final.modes() == ("retrieval",)
    rc = main(["predict", "--checkpoint", str(out / "final" / "model.pt"), "--image",
               str(three_patients["root"] / "S2_HE.jpg"), "--spots", str(three_patients["root"] / "S2_selection.tsv"),
               "--out", str(out / "s2.h5ad"), "--cache-dir", str(three_patients["cache"]), "--quiet"])
    a = ad.read_h5ad(out / "s2.h5ad")
    assert rc == 0 and a.uns["gnnst"]["model"]["name"] == "bleep" and np.isfinite(a.X).all()


def test_leaky_protocol_is_one_visible_switch(three_patients, capsys):
    """eval.select_on_heldout=true: panel chosen with the held-out slide, which is also the validation set;
    every output says LEAKY."""
    from gnnst.predictor import TrainedModel

    out = three_patients["tmp"] / "leaky"
    assert _train(three_patients, out, "eval.select_on_heldout=true", "eval.only_folds=[S1]", "train.ensemble=1",
                  "eval.baselines=[ridge]", "eval.final_model=false") == 0
    printed = capsys.readouterr()
    assert "LEAKY" in printed.out and "LEAKY" in printed.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"].startswith("LEAKY") and m["folds"][0]["protocol"].startswith("LEAKY")
    model = TrainedModel.load(out / "folds" / "patient_P1" / "model.pt")
    assert "S1" in model.panel.source_slides and model.protocol.startswith("LEAKY")  # the held-out slide chose genes
    assert ad.read_h5ad(out / "predictions" / "S1.h5ad").uns["gnnst"]["model"]["protocol"].startswith("LEAKY")
