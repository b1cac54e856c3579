"""Real data: a one-fold her2st run exported and used by squidpy as it is (skipped without the data)."""

import os

import anndata as ad
import numpy as np
import pytest

from gnnst import keys
from gnnst.cli import main

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_export_b4_in_squidpy(her2st_root, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    cache = os.environ.get("GNNST_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(her2st_root), "--cache-dir", cache, "--out", str(run), "--quiet",
                 "data.download=false", "data.slides=[B4, C2]", "eval.only_folds=[B4]", "train.epochs=2",
                 "train.ensemble=1", "train.num_threads=1", "eval.figures=false", "eval.baselines=[]"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    a = ad.read_h5ad(tmp_path / "export" / "B4.h5ad")
    assert a.n_obs == 283
    degree = np.asarray(a.obsp[keys.CONNECTIVITIES].sum(1)).ravel()
    assert (degree == 6).all()  # graph.k = 6: six neighbours per spot
    d = a.obsp[keys.DISTANCES].data
    assert 100 < d.min() and 180 < np.median(d) < 300  # µm: 200 µm array pitch, spots placed by detection
    lib = a.uns[keys.SPATIAL]["B4"]
    h, w = lib[keys.IMAGES][keys.HIRES].shape[:2]
    xy = a.obsm[keys.SPATIAL] * lib[keys.SCALEFACTORS][keys.HIRES_SCALEF]
    assert max(h, w) == 2000 and (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    diameter_um = lib[keys.SCALEFACTORS][keys.SPOT_DIAMETER] * a.uns[keys.UNS_GNNST][keys.MPP]
    assert diameter_um == pytest.approx(100, rel=0.1)  # half the median spot spacing; ST spots are 100 µm
    m = sq.gr.spatial_autocorr(a, connectivity_key="spatial_connectivities", mode="moran", layer="gnnst_pred",
                               copy=True)
    assert np.isfinite(m["I"]).sum() > 100
    sq.pl.spatial_scatter(a, color="ERBB2", library_id="B4")
    plt.savefig(tmp_path / "erbb2.png")
    plt.close("all")
    sc.pp.pca(a, layer="gnnst_pred", n_comps=10)
    assert a.obsm["X_pca"].shape == (283, 10)
