"""Predictions written as a SpatialData store: read back by spatialdata, drawn by spatialdata-plot."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("spatialdata")
pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding")

from gnnst import keys  # noqa: E402
from gnnst.errors import GnnstError  # noqa: E402
from gnnst.export.spatialdata import write_spatialdata  # noqa: E402
from gnnst_testdata import write_spatialdata_store  # noqa: E402

GENES = ["ERBB2", "KRT19", "MGP", "IGKC"]


def _predictions(image_path, *, slide_id="S1", xy=None, seed=0):
    """A prediction AnnData as `gnnst predict` writes one; spots at ``xy`` ``[N, 2]`` (pixels), by default
    on a 5 x 4 square lattice 30 px apart."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    if xy is None:
        xy = np.array([[40.0 + i * 30.0, 35.0 + j * 30.0] for j in range(4) for i in range(5)])
    pred = rng.normal(size=(len(xy), len(GENES))).astype(np.float32)
    a = ad.AnnData(X=pred, obs=pd.DataFrame(index=pd.Index([f"{slide_id}_s{i}" for i in range(len(xy))],
                                                            name=keys.BARCODE)),
                   var=pd.DataFrame(index=GENES))
    a.layers[keys.PRED] = pred.copy()
    a.obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * len(xy))
    a.obsm[keys.SPATIAL] = xy
    a.obsm[keys.img_key("enc")] = rng.normal(size=(len(xy), 8)).astype(np.float32)
    a.obsp["spatial_connectivities"] = sp.eye(len(xy), format="csr", dtype=np.float32)
    a.uns[keys.UNS_GNNST] = {"version": "test", keys.MPP: 2.0, keys.IMAGE_PATH: str(image_path), "fold": ""}
    return a


@pytest.fixture
def he_png(tmp_path):
    from PIL import Image

    rgb = np.zeros((200, 300, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(300)[None, :] % 256
    rgb[..., 1] = np.arange(200)[:, None]
    path = tmp_path / "he.png"
    Image.fromarray(rgb).save(path)
    return path


def _read(path):
    import spatialdata as sd

    return sd.read_zarr(path)


def _centres(sdata, table, region):
    """Centres ``[N, 2]`` of the shapes the table's rows annotate, in row order."""
    shapes = sdata.shapes[region]
    g = shapes.geometry.loc[table.obs[keys.SD_INSTANCE].to_numpy()]
    if (g.geom_type == "Point").all():
        return np.c_[g.x, g.y]
    c = g.centroid
    return np.c_[c.x, c.y]


def test_spot_predictions_round_trip(tmp_path, he_png):
    from spatialdata.transformations import get_transformation

    import pandas as pd

    a = _predictions(he_png)
    a.obs["note"] = pd.array([f"n{i}" for i in range(a.n_obs)], dtype="string")  # pandas' nullable strings
    before = a.copy()
    path = write_spatialdata(a, tmp_path / "pred.zarr", max_side=100)
    assert list(a.obs.columns) == list(before.obs.columns) and a.uns.keys() == before.uns.keys()  # not modified
    sdata = _read(path)
    assert set(sdata.images) == {"S1_image"} and set(sdata.shapes) == {"S1_spots"}
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"] == {"region": "S1_spots", "region_key": "region",
                                              "instance_key": "instance_id"}
    assert list(table.obs_names) == list(a.obs_names) and list(table.var_names) == GENES
    np.testing.assert_array_equal(np.asarray(table.X), a.X)
    np.testing.assert_array_equal(table.layers[keys.PRED], a.layers[keys.PRED])
    assert table.uns[keys.UNS_GNNST][keys.MPP] == 2.0 and keys.SPATIAL not in table.uns
    assert (table.obs[keys.SD_REGION] == "S1_spots").all() and list(table.obs["note"]) == list(a.obs["note"])
    np.testing.assert_allclose(_centres(sdata, table, "S1_spots"), a.obsm[keys.SPATIAL])
    np.testing.assert_allclose(sdata.shapes["S1_spots"]["radius"], 0.25 * 30.0)  # half the pitch, halved
    # the 300 x 200 image as a 100 x 67 thumbnail scaled back onto full-resolution pixels, in the same system
    img = sdata.images["S1_image"]
    assert img.shape == (3, 67, 100) and str(img.dtype) == "uint8"
    scale = get_transformation(img, to_coordinate_system="S1").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(scale)[:2], [3.0, 3.0])
    assert "S1" in get_transformation(sdata.shapes["S1_spots"], get_all=True)


@pytest.mark.parametrize("kind, area", [("hex", np.sqrt(3) / 2 * 30.0 ** 2), ("square", 30.0 ** 2)])
def test_grid_cells_tile_the_slide(tmp_path, he_png, kind, area):
    from gnnst.data.grid import grid_points

    xy, _ = grid_points((0, 0, 200, 150), pitch_px=30.0, kind=kind)
    a = _predictions(he_png, xy=xy)
    a.uns[keys.UNS_GNNST]["grid"] = {"kind": kind, "pitch_um": 60.0, "pitch_px": 30.0}
    sdata = _read(write_spatialdata(a, tmp_path / "grid.zarr", max_side=100))
    cells = sdata.shapes["S1_grid"].geometry
    np.testing.assert_allclose(cells.area, area)
    np.testing.assert_allclose(_centres(sdata, sdata.tables["table"], "S1_grid"), a.obsm[keys.SPATIAL], atol=1e-9)
    assert cells.union_all().area == pytest.approx(area * len(cells))  # neighbouring cells do not overlap
    near = cells.iloc[0].distance(cells.iloc[1])
    assert near == pytest.approx(0.0, abs=1e-9)  # ... and touch: the grid is tiled


def test_existing_store_refused_overwritten_only_when_complete(tmp_path, he_png):
    a = _predictions(he_png)
    path = write_spatialdata(a, tmp_path / "pred.zarr", max_side=100)
    with pytest.raises(GnnstError, match="exists"):
        write_spatialdata(a, path)
    broken = a.copy()
    broken.uns[keys.UNS_GNNST][keys.IMAGE_PATH] = str(tmp_path / "gone.png")
    with pytest.raises(GnnstError, match="image not found.*gone.png"):
        write_spatialdata(broken, path, overwrite=True)
    np.testing.assert_array_equal(np.asarray(_read(path).tables["table"].X), a.X)  # the old store is intact
    b = a.copy()
    b.X = b.X + 1
    write_spatialdata(b, path, overwrite=True)
    np.testing.assert_array_equal(np.asarray(_read(path).tables["table"].X), b.X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["he.png", "pred.zarr"]  # no temporary folder left
    with pytest.raises(GnnstError, match="ends in .zarr"):
        write_spatialdata(a, tmp_path / "pred.h5ad")


def test_several_slides_one_coordinate_system_each(tmp_path, he_png):
    import anndata as ad

    from gnnst.export.anndata import add_image

    parts = []
    for i, s in enumerate(["A 1", "B2"]):
        p = _predictions(he_png, slide_id=s, seed=i)
        add_image(p, he_png, library_id=s, mpp=2.0, max_side=150)  # uns['spatial'] thumbnail, as `gnnst export`
        parts.append(p)
    both = ad.concat(parts, uns_merge="unique")
    both.uns[keys.SPATIAL] = {s: p.uns[keys.SPATIAL][s] for s, p in zip(["A 1", "B2"], parts)}
    sdata = _read(write_spatialdata(both, tmp_path / "two.zarr", include_image=True))
    assert set(sdata.coordinate_systems) == {"A 1", "B2"}
    assert set(sdata.shapes) == {"A_1_spots", "B2_spots"} and set(sdata.images) == {"A_1_image", "B2_image"}
    table = sdata.tables["table"]
    assert sorted(table.uns["spatialdata_attrs"]["region"]) == ["A_1_spots", "B2_spots"]
    for s, name in (("A 1", "A_1_spots"), ("B2", "B2_spots")):
        rows = (table.obs[keys.SLIDE_ID] == s).to_numpy()
        assert (table.obs[keys.SD_REGION][rows] == name).all()
        sub = table[rows]
        np.testing.assert_allclose(_centres(sdata, sub, name), both.obsm[keys.SPATIAL][rows])
    assert sdata.images["A_1_image"].shape == (3, 100, 150)


def test_spatialdata_in_and_out(tmp_path):
    """A store read by the spatialdata reader, its predictions written back: the image element (small
    enough to be stored unscaled) and the spots land on the same pixels as in the input store."""
    from gnnst.data.readers.spatialdata import read_spatialdata
    from spatialdata.transformations import Scale

    truth = write_spatialdata_store(tmp_path / "in.zarr", spots_transform=Scale([2.0, 2.0], axes=("x", "y")),
                                    lowres=False)
    slide = read_spatialdata(tmp_path / "in.zarr", slide_id="S", pitch_um=100.0)
    a = _predictions(slide.uns["gnnst"]["image_path"], slide_id="S", xy=slide.obsm[keys.SPATIAL])
    sdata = _read(write_spatialdata(a, tmp_path / "out.zarr"))
    np.testing.assert_array_equal(np.asarray(sdata.images["S_image"]).transpose(1, 2, 0), truth["image"])
    np.testing.assert_allclose(_centres(sdata, sdata.tables["table"], "S_spots"), truth["xy"] * 2.0)


def test_spatialdata_plot_draws_the_store_unchanged(tmp_path, he_png):
    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = write_spatialdata(_predictions(he_png), tmp_path / "pred.zarr", max_side=100)
    sdata = _read(path)
    png = tmp_path / "erbb2.png"
    sdata.pl.render_images().pl.render_shapes(color="ERBB2").pl.show(save=png)
    plt.close("all")
    assert png.stat().st_size > 5000
