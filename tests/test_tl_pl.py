"""gnnst.tl.predict on an AnnData read by scanpy.read_visium, gnnst.pl.prediction, and the SpatialData round
trip of what `gnnst predict` and gnnst.tl.predict write."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import gnnst
from gnnst import keys
from gnnst.cli import main
from gnnst.errors import GnnstError
from gnnst_testdata import he_like_image, write_10x_h5

MPP = 1.0  # µm per full-resolution pixel of the test slide
GENES = ["G0", "G1", "G2", "G3"]  # the model's panel
MEASURED = ["G1", "G3", "OTHER"]  # the Visium slide's genes: two in the panel, one not


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    """A Space Ranger outs/ folder (10x h5, positions, scale factors, hires + lowres PNG), the full-resolution
    H&E, a spot table of the same spots and a two-member model with an OOD reference and a cross-validated PCC."""
    from PIL import Image

    from gnnst.data.encoders import create_encoder
    from gnnst.predictor import EncoderInfo, TrainedModel
    from gnnst.reliability import OODReference

    tmp = tmp_path_factory.mktemp("visium")
    rng = np.random.default_rng(0)
    he = he_like_image(rng, (560, 480))  # [h, w, 3]
    Image.fromarray(he).save(tmp / "he.png")
    xs, ys = np.meshgrid(np.arange(100, 480, 90.0), np.arange(100, 400, 90.0))
    xy = np.c_[xs.ravel(), ys.ravel()]  # [N, 2] full-resolution (x, y)
    barcodes = [f"AC{i:03d}-1" for i in range(len(xy))]
    outs = tmp / "outs"
    (outs / "spatial").mkdir(parents=True)
    counts = rng.poisson(5, size=(len(xy), len(MEASURED)))
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, [(f"E{i}", g, "Gene Expression")
                                                                           for i, g in enumerate(MEASURED)])
    pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": np.arange(len(xy)), "array_col": 0,
                  "pxl_row_in_fullres": xy[:, 1].astype(int), "pxl_col_in_fullres": xy[:, 0].astype(int)}
                 ).to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 55.0 / MPP, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}))
    Image.fromarray(he).resize((280, 240)).save(outs / "spatial" / "tissue_hires_image.png")
    Image.fromarray(he).resize((56, 48)).save(outs / "spatial" / "tissue_lowres_image.png")
    pd.DataFrame({"barcode": barcodes, "pixel_x": xy[:, 0], "pixel_y": xy[:, 1]}).to_csv(tmp / "spots.csv", index=False)
    info = EncoderInfo.of(create_encoder("efficientnet_lite0"))
    tm = TrainedModel.untrained(info, GENES, patch_size_um=100.0, seed=0)
    tm.states.append(TrainedModel.untrained(info, GENES, patch_size_um=100.0, seed=1).states[0])  # two members
    ref_rng = np.random.default_rng(1)
    tm.ood_reference = OODReference.build([np.abs(ref_rng.normal(size=(30, info.dim))).astype(np.float32)
                                           for _ in range(2)], k=5, quantile=0.99, cap=100, seed=0)
    tm.cv = {"genes": GENES, "pcc_mean": [0.5, 0.1, None, 0.35], "pcc_sd": [0.1, 0.2, None, None],
             "n_slides": [2, 2, 0, 1], "pcc_patient_disjoint": [0.4, None, None, 0.3], "definition": "test"}
    tm.save(tmp / "model.pt")
    return {"tmp": tmp, "outs": outs, "model": tmp / "model.pt", "xy": xy, "barcodes": barcodes, "cache": tmp / "cache"}


def _read_visium(outs):
    sc = pytest.importorskip("scanpy")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = sc.read_visium(outs, library_id="lib1")
    a.var_names_make_unique()
    return a


def test_tl_predict_on_read_visium(visium):
    a = _read_visium(visium["outs"])
    n = a.n_obs
    assert gnnst.tl.predict(a, visium["model"], cache_dir=str(visium["cache"]), progress=False) is None
    pred = a.obsm[keys.PRED]
    assert isinstance(pred, pd.DataFrame) and list(pred.columns) == GENES and pred.shape == (n, 4)
    assert list(pred.index) == list(a.obs_names) and np.isfinite(pred.to_numpy()).all()
    sd = a.obsm[keys.SD]
    assert sd.shape == (n, 4) and (sd.to_numpy() >= 0).all() and (sd.to_numpy() > 0).any()
    assert a.obs[keys.OOD].dtype == bool and np.isfinite(a.obs[keys.OOD_SCORE]).all()
    assert a.obsm["X_img_efficientnet_lite0"].shape == (n, 1280)
    # reliability for the slide's genes that are in the panel; NaN / False for the others
    np.testing.assert_allclose(a.var[keys.CV_PCC].to_numpy(), [0.1, 0.35, np.nan], rtol=1e-6)
    assert list(a.var[keys.RELIABLE]) == [False, True, False]  # default threshold 0.3
    meta = a.uns[keys.UNS_GNNST]
    assert meta[keys.MPP] == pytest.approx(55.0 / 55.0)  # Visium 55 µm spots over spot_diameter_fullres
    pr = meta["prediction"]
    assert pr["image"] == "<uns['spatial']['lib1']['images']['hires']>" and pr["image_scalef"] == 0.5
    table = pr["reliability"]["gene_table"]
    assert list(table.index) == GENES and pr["reliability"]["genes"]["n_reliable"] == 2
    assert pr["reliability"]["sd"]["members"] == 2 and (a.obs[keys.SLIDE_ID] == "lib1").all()
    back = ad.read_h5ad(_write(a, visium["tmp"] / "tl.h5ad"))  # what tl.predict writes is writable
    np.testing.assert_allclose(back.obsm[keys.PRED].to_numpy(), pred.to_numpy())


def _write(a, path):
    from gnnst.io import atomic_write_h5ad

    atomic_write_h5ad(a, path)
    return path


def test_tl_predict_copy_threshold_and_the_cli_run_the_same_prediction(visium):
    a = _read_visium(visium["outs"])
    before = a.copy()
    b = gnnst.tl.predict(a, visium["model"], image=visium["tmp"] / "he.png", copy=True, reliable_pcc=0.05,
                         cache_dir=str(visium["cache"]), progress=False)
    assert keys.PRED not in a.obsm and list(a.obs.columns) == list(before.obs.columns)  # copy: input untouched
    assert list(b.var[keys.RELIABLE]) == [True, True, False]
    out = visium["tmp"] / "cli.h5ad"
    assert main(["predict", "--checkpoint", str(visium["model"]), "--image", str(visium["tmp"] / "he.png"),
                 "--spots", str(visium["tmp"] / "spots.csv"), "--mpp", str(MPP), "--out", str(out),
                 "--cache-dir", str(visium["cache"]), "--quiet"]) == 0
    c = ad.read_h5ad(out)
    assert list(c.obs_names) == list(b.obs_names)
    # the full-resolution image and the same spots: gnnst predict and gnnst.tl.predict compute the same
    np.testing.assert_allclose(b.obsm[keys.PRED][list(c.var_names)].to_numpy(), c.layers[keys.PRED], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.obsm[keys.SD][list(c.var_names)].to_numpy(), c.layers[keys.SD], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.obs[keys.OOD_SCORE].to_numpy(), c.obs[keys.OOD_SCORE].to_numpy(), rtol=1e-5)


def test_tl_predict_warns_on_a_lowres_image_and_refuses_bad_input(visium, caplog):
    a = _read_visium(visium["outs"])
    del a.uns["spatial"]["lib1"]["images"]["hires"]  # only the 0.1x image: 10 px patches
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        gnnst.tl.predict(a, visium["model"], cache_dir=str(visium["cache"]), progress=False)
    assert "UNRELIABLE" in caplog.text and "lowres" in caplog.text
    two = _read_visium(visium["outs"])
    two.uns["spatial"]["lib2"] = two.uns["spatial"]["lib1"]
    with pytest.raises(GnnstError, match="2 libraries"):
        gnnst.tl.predict(two, visium["model"], progress=False)
    with pytest.raises(GnnstError, match="is not in uns"):
        gnnst.tl.predict(a, visium["model"], library_id="nope", progress=False)
    none = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]))
    none.obsm["spatial"] = np.zeros((2, 2))
    with pytest.raises(GnnstError, match="no image"):
        gnnst.tl.predict(none, visium["model"], mpp=1.0, progress=False)
    with pytest.raises(GnnstError, match="obsm\\['spatial'\\]"):
        gnnst.tl.predict(ad.AnnData(obs=pd.DataFrame(index=["a"])), visium["model"], progress=False)


def test_pl_prediction_draws_both_layouts(visium, tmp_path):
    a = _read_visium(visium["outs"])
    gnnst.tl.predict(a, visium["model"], cache_dir=str(visium["cache"]), progress=False)
    fig = gnnst.pl.prediction(a, ["G1", "G0"], save=tmp_path / "tl.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert "G1: measured" in titles and "G1: predicted" in titles and "G1: ensemble sd" in titles
    assert any(t.startswith("OOD score") for t in titles) and (tmp_path / "tl.png").stat().st_size > 1000
    g1 = gnnst.tl.measured(a, "G1")
    counts = np.asarray(a.X.todense())
    np.testing.assert_allclose(g1, np.log1p(counts[:, 0] / counts.sum(1) * 1e4))  # the model's units
    assert gnnst.tl.measured(a, "G0") is None  # not measured on this slide: an empty panel
    out = visium["tmp"] / "plot.h5ad"
    assert main(["predict", "--checkpoint", str(visium["model"]), "--image", str(visium["tmp"] / "he.png"),
                 "--spots", str(visium["tmp"] / "spots.csv"), "--mpp", str(MPP), "--out", str(out),
                 "--cache-dir", str(visium["cache"]), "--quiet"]) == 0
    fig = gnnst.pl.prediction(ad.read_h5ad(out), "G2")
    assert [ax.get_title() for ax in fig.axes][:2] == ["G2: predicted", "G2: ensemble sd"]  # nothing measured
    with pytest.raises(GnnstError, match="not in the model's panel"):
        gnnst.pl.prediction(a, "NOPE")


def test_spatialdata_round_trip_of_cli_and_tl_predictions(visium, tmp_path):
    sd = pytest.importorskip("spatialdata")
    from gnnst.export.spatialdata import write_spatialdata

    zarr, h5 = tmp_path / "pred.zarr", tmp_path / "pred.h5ad"
    for out in (zarr, h5):
        assert main(["predict", "--checkpoint", str(visium["model"]), "--image", str(visium["tmp"] / "he.png"),
                     "--spots", str(visium["tmp"] / "spots.csv"), "--mpp", str(MPP), "--out", str(out),
                     "--cache-dir", str(visium["cache"]), "--quiet"]) == 0
    ref = ad.read_h5ad(h5)
    s = sd.read_zarr(zarr)
    t = s.tables[keys.SD_TABLE]
    np.testing.assert_allclose(t.layers[keys.PRED], ref.layers[keys.PRED])
    np.testing.assert_allclose(t.layers[keys.SD], ref.layers[keys.SD])
    assert list(t.obs[keys.OOD]) == list(ref.obs[keys.OOD]) and list(t.var[keys.RELIABLE]) == list(ref.var[keys.RELIABLE])
    circles = s.shapes[t.obs[keys.SD_REGION].iloc[0]]
    centres = np.c_[circles.geometry.x, circles.geometry.y][t.obs[keys.SD_INSTANCE].to_numpy()]
    np.testing.assert_allclose(centres, ref.obsm[keys.SPATIAL])  # the table annotates the spots' circles
    assert main(["predict", "--checkpoint", str(visium["model"]), "--image", str(visium["tmp"] / "he.png"),
                 "--spots", str(visium["tmp"] / "spots.csv"), "--mpp", str(MPP), "--out", str(zarr), "--quiet"]) == 2
    # what gnnst.tl.predict wrote into a read_visium AnnData goes to a store the same way
    a = _read_visium(visium["outs"])
    gnnst.tl.predict(a, visium["model"], cache_dir=str(visium["cache"]), progress=False)
    s2 = sd.read_zarr(write_spatialdata(a, tmp_path / "tl.zarr"))
    t2 = s2.tables[keys.SD_TABLE]
    np.testing.assert_allclose(t2.obsm[keys.PRED].to_numpy(), a.obsm[keys.PRED].to_numpy())
    assert list(t2.obsm[keys.PRED].columns) == GENES and "lib1_image" in s2.images
    np.testing.assert_allclose(t2.obs[keys.OOD_SCORE].to_numpy(), a.obs[keys.OOD_SCORE].to_numpy())
