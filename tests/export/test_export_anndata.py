"""`gnnst export`: the .h5ad files work in scanpy/squidpy as they are, and carry the gnnst graph."""

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gnnst import keys
from gnnst.cli import main
from gnnst_tinyrun import SLIDES, TINY_RUN, data_args, tiny_run  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("export")
    assert main(["export", "--run", str(tiny_run["run"]), "--out", str(out / "per_slide")]) == 0
    assert main(["export", "--run", str(tiny_run["run"]), "--out", str(out / "concat"), "--concat"]) == 0
    # the gnnst graphs built independently, by the build-graphs command (embeddings from the run's cache)
    assert main(["build-graphs", *data_args(tiny_run), "--out", str(out / "graphs"), "--quiet",
                 *[o for o in TINY_RUN if o.startswith(("graph.", "expression.", "encoder."))]]) == 0
    return out


def _squidpy_and_scanpy_run(adata, gene, library_id, png, **scatter_kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    before = adata.copy()
    m = sq.gr.spatial_autocorr(adata, connectivity_key="spatial_connectivities", mode="moran", copy=True)
    mp = sq.gr.spatial_autocorr(adata, connectivity_key="spatial_connectivities", mode="moran", layer="gnnst_pred",
                                copy=True)
    assert set(m.index) == set(adata.var_names) and np.isfinite(m["I"]).any()
    assert set(mp.index) == set(adata.var_names) and np.isfinite(mp["I"]).any()
    sq.pl.spatial_scatter(adata, color=gene, library_id=library_id, **scatter_kw)
    plt.savefig(png)
    plt.close("all")
    assert png.stat().st_size > 5000
    pca = sc.pp.pca(adata, layer="gnnst_pred", n_comps=3, copy=True)
    assert pca.obsm["X_pca"].shape == (adata.n_obs, 3) and np.isfinite(pca.obsm["X_pca"]).all()
    # nothing above needed (or made) a change to the export
    assert adata.obsp.keys() == before.obsp.keys() and adata.uns.keys() == before.uns.keys()


def test_per_slide_export_runs_in_squidpy_and_scanpy(exported, tmp_path):
    for s in SLIDES:
        a = ad.read_h5ad(exported / "per_slide" / f"{s}.h5ad")
        assert a.X.shape == a.layers[keys.PRED].shape and a.obsm[keys.SPATIAL].shape == (a.n_obs, 2)
        assert any(k.startswith("X_img_") for k in a.obsm)
        assert (a.obs[keys.SLIDE_ID] == s).all()
        lib = a.uns[keys.SPATIAL][s]
        img = lib[keys.IMAGES][keys.HIRES]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert lib[keys.SCALEFACTORS][keys.HIRES_SCALEF] == pytest.approx(img.shape[1] / 260)  # image width 260 px
        assert lib[keys.SCALEFACTORS][keys.SPOT_DIAMETER] == pytest.approx(20.0)  # half the 40 px pitch
        meta = a.uns[keys.UNS_GNNST]
        assert meta["version"] and json.loads(meta["config"])["graph"]["k"] == 4
        assert "pcc_heg" in json.loads(meta["metrics"])  # this slide's scores (gnnst.metrics.slide_scores)
        # the one uns['gnnst'] layout of gnnst.predictions, plus the run folder
        assert meta["slide_id"] == s and meta["model"]["held_out"].tolist() == [s] and meta["run"]
        assert meta["graph"]["k"] == 4 and meta["graph"]["units"] == "um" and meta["X"].startswith("measured")
        assert a.uns[keys.NEIGHBORS]["connectivities_key"] == keys.CONNECTIVITIES
        assert a.uns[keys.NEIGHBORS]["params"]["n_neighbors"] == 4
    _squidpy_and_scanpy_run(a, a.var_names[0], s, tmp_path / "scatter.png")


def test_concat_export_runs_in_squidpy_and_scanpy(exported, tmp_path):
    a = ad.read_h5ad(exported / "concat" / "all_slides.h5ad")
    assert list(a.obs[keys.SLIDE_ID].cat.categories) == list(SLIDES) and a.n_obs == 60
    assert set(a.uns[keys.SPATIAL]) == set(SLIDES)
    assert set(a.uns[keys.UNS_GNNST]["slides"]) == set(SLIDES)
    assert "pcc_heg_per_slide" in json.loads(a.uns[keys.UNS_GNNST]["metrics"])  # the run's summary
    _squidpy_and_scanpy_run(a, a.var_names[0], "S2", tmp_path / "scatter.png", library_key=keys.SLIDE_ID)


def test_exported_graph_is_the_gnnst_graph(exported):
    """Per slide: obsp holds exactly the build-graphs edges (row = centre, column = neighbour)."""
    for s in SLIDES:
        a = ad.read_h5ad(exported / "per_slide" / f"{s}.h5ad")
        data = torch.load(exported / "graphs" / f"{s}.pt", weights_only=False)
        assert list(a.obs_names) == list(data.barcodes)
        src, dst = data.edge_index.numpy()
        n = data.num_nodes
        want = sp.csr_matrix((np.ones(len(src)), (dst, src)), shape=(n, n))
        conn = a.obsp[keys.CONNECTIVITIES]
        assert conn.nnz == len(src) and (conn != want).nnz == 0
        dist = a.obsp[keys.DISTANCES]
        np.testing.assert_allclose(np.asarray(dist[dst, src]).ravel(), data.edge_attr[:, 2].numpy(), rtol=1e-5)


def test_concat_graph_is_block_diagonal(exported):
    c = ad.read_h5ad(exported / "concat" / "all_slides.h5ad")
    codes = c.obs[keys.SLIDE_ID].cat.codes.to_numpy()
    rows, cols = c.obsp[keys.CONNECTIVITIES].nonzero()
    assert len(rows) and (codes[rows] == codes[cols]).all()  # no edge between slides
    for s in SLIDES:
        one = ad.read_h5ad(exported / "per_slide" / f"{s}.h5ad")
        mask = (c.obs[keys.SLIDE_ID] == s).to_numpy()
        block = c.obsp[keys.CONNECTIVITIES][mask][:, mask]
        assert (block != one.obsp[keys.CONNECTIVITIES]).nnz == 0
        genes = [g for g in c.var_names]
        np.testing.assert_array_equal(c[mask, genes].layers[keys.PRED], one[:, genes].layers[keys.PRED])


def test_export_errors(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no predictions/<slide>.h5ad" in capsys.readouterr().err


def test_export_unknown_slide(tiny_run, tmp_path, capsys):  # noqa: F811
    assert main(["export", "--run", str(tiny_run["run"]), "--out", str(tmp_path / "x"), "--slides", "S9"]) == 2
    assert "no predictions for slide 'S9'" in capsys.readouterr().err


def test_add_spatial_graph_hand_placed():
    from gnnst.graph.edges import slide_graph
    from gnnst.graph.neighbors import add_spatial_graph

    a = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    a.obsm[keys.SPATIAL] = np.array([[0.0, 0.0], [10.0, 0.0], [30.0, 0.0], [60.0, 0.0]])  # pixels, mpp 2
    g = slide_graph(a.obsm[keys.SPATIAL], 2.0, k=1, radius_um=None)
    ei, dist = g.edge_index, g.distances
    # nearest neighbour of each spot: 0 <- 1, 1 <- 0, 2 <- 1, 3 <- 2
    assert ei.tolist() == [[1, 0, 1, 2], [0, 1, 2, 3]]
    np.testing.assert_allclose(dist, [20.0, 20.0, 40.0, 60.0])
    b = add_spatial_graph(a, ei, dist, k=1, copy=True)
    assert keys.CONNECTIVITIES not in a.obsp  # copy=True leaves the input alone
    assert b.obsp[keys.CONNECTIVITIES].toarray().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
    assert b.obsp[keys.DISTANCES][3, 2] == 60.0
    assert b.uns[keys.NEIGHBORS]["params"] == {"coord_type": "generic", "n_neighbors": 1, "radius": None,
                                               "transform": None, "units": "um", "source": "gnnst"}
