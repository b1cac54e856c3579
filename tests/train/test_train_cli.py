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
    m = json.loads((out / "metrics.json").read_text())
    for k in ("pcc_heg50_per_slide", "pcc_hvg50_per_slide", "pcc_all_per_slide", "pcc_heg50_pooled", "mse", "mae"):
        assert np.isfinite(m["summary"][k]), k
        assert k in m["baselines"]["ridge"]
    assert len(m["folds"]) == 3  # three patients: leave one patient out
    for f in m["folds"]:
        assert f["patient_disjoint"] is True and len(f["test_slides"]) == 1
        assert f["test_slides"][0] not in f["train_slides"]
        assert set(f["genes"]["heg50"]) <= set(f["genes"]["all"])
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
    import torch

    final = torch.load(out / "final" / "model.pt", weights_only=False)
    assert final["fold"]["name"] == "final" and final["fold"]["train_slides"] == ["S1", "S2", "S3"]
    assert final["fold"]["test_slides"] == [] and len(final["model_states"]) == 2
    fold_ck = torch.load(out / "folds" / "patient_P1" / "model.pt", weights_only=False)
    assert fold_ck["fold"]["train_slides"] == ["S2", "S3"]  # the folds' checkpoints never saw their test slide
    rc = main(["predict", "--checkpoint", str(out / "final" / "model.pt"), "--image",
               str(three_patients["root"] / "S1_HE.jpg"), "--spots", str(three_patients["root"] / "S1_selection.tsv"),
               "--out", str(out / "s1_final.h5ad"), "--cache-dir", str(three_patients["cache"]), "--quiet"])
    assert rc == 0 and ad.read_h5ad(out / "s1_final.h5ad").n_vars == len(final["panel"]["genes"])


def test_resume_reproduces_uninterrupted_run(three_patients, monkeypatch):
    ds = three_patients
    assert _train(ds, ds["tmp"] / "full") == 0
    full = json.loads((ds["tmp"] / "full" / "metrics.json").read_text())

    import gnnst.io

    real_save, calls = gnnst.io.atomic_torch_save, {"n": 0}

    def interrupt_after_some_epochs(obj, path):
        real_save(obj, path)
        if str(path).endswith("last.pt"):
            calls["n"] += 1
            if calls["n"] == 8:  # 3 epochs x 2 members per fold: second fold, first member, mid-training
                raise KeyboardInterrupt

    monkeypatch.setattr(gnnst.io, "atomic_torch_save", interrupt_after_some_epochs)
    assert _train(ds, ds["tmp"] / "cut") == 130
    assert not (ds["tmp"] / "cut" / "metrics.json").exists()
    monkeypatch.setattr(gnnst.io, "atomic_torch_save", real_save)
    assert _train(ds, ds["tmp"] / "cut", "--resume") == 0
    resumed = json.loads((ds["tmp"] / "cut" / "metrics.json").read_text())
    assert resumed["summary"] == full["summary"]
    assert [f["val_pcc_members"] for f in resumed["folds"]] == [f["val_pcc_members"] for f in full["folds"]]


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
    assert _train(ds, ds["tmp"] / "f32", "graph.storage=float32", "train.ensemble=1", "eval.ridge=false") == 0
    assert _train(ds, ds["tmp"] / "f16", "graph.storage=float16", "train.ensemble=1", "eval.ridge=false") == 0
    a = ad.read_h5ad(ds["tmp"] / "f32" / "predictions" / "S1.h5ad").layers["gnnst_pred"]
    b = ad.read_h5ad(ds["tmp"] / "f16" / "predictions" / "S1.h5ad").layers["gnnst_pred"]
    assert np.isfinite(b).all() and not np.array_equal(a, b)  # the half run really ran on rounded inputs
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
