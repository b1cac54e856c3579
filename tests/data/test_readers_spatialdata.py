"""The ``spatialdata`` reader on tiny SpatialData stores written by the test, and the OME-Zarr image
backend that cuts patches from their image element."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("spatialdata")
pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding")

from gnnst_testdata import write_spatialdata_store  # noqa: E402
from gnnst.data.images import open_image  # noqa: E402
from gnnst.data.manifest import folder_sha256, load_manifest  # noqa: E402
from gnnst.data.slides import read_slide  # noqa: E402
from gnnst.data.readers.spatialdata import read_spatialdata  # noqa: E402
from gnnst.errors import GnnstError  # noqa: E402


def _tf(kind):
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    return {"identity": Identity(), "scale2": Scale([2.0, 2.0], axes=("x", "y")),
            "half": Scale([0.5, 0.5], axes=("x", "y")),
            "scale2_shift": Sequence([Scale([2.0, 2.0], axes=("x", "y")), Translation([7.0, -3.0], axes=("x", "y"))]),
            }[kind]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "slide.zarr"
    return path, write_spatialdata_store(path)


def test_reads_the_canonical_anndata(store):
    path, truth = store
    a = read_spatialdata(path, slide_id="S1")
    assert list(a.obs_names) == truth["barcodes"]  # the table's rows, matched to spots by instance id
    assert list(a.var_names) == truth["genes"]
    np.testing.assert_array_equal(a.X.toarray(), truth["counts"])
    np.testing.assert_array_equal(a.layers["counts"].toarray(), truth["counts"])
    np.testing.assert_allclose(a.obsm["spatial"], truth["xy"])  # identity transformations: pixels = element units
    assert a.obsm["spatial"][0].tolist() == truth["xy"][0].tolist()
    assert list(a.obs["slide_id"].unique()) == ["S1"]
    meta = a.uns["gnnst"]
    assert meta["source"] == "spatialdata" and meta["mpp"] is None and meta["image_scalef"] == 1.0
    assert meta["image_path"] == str(path / "images" / "he")  # the largest of 'he' and 'he_lowres'


@pytest.mark.parametrize("spots_tf, image_tf, factor, shift", [
    ("scale2", "identity", 2.0, (0.0, 0.0)),  # spots in half-resolution units
    ("identity", "half", 2.0, (0.0, 0.0)),  # image pixels half a unit: pixel = 2 x unit
    ("scale2_shift", "identity", 2.0, (7.0, -3.0)),  # a sequence: scale, then translate
    ("scale2_shift", "half", 4.0, (14.0, -6.0)),
])
def test_transformations_map_spots_onto_image_pixels(tmp_path, spots_tf, image_tf, factor, shift):
    truth = write_spatialdata_store(tmp_path / "s.zarr", spots_transform=_tf(spots_tf), image_transform=_tf(image_tf),
                                    lowres=False, image_size=(240, 200))
    a = read_spatialdata(tmp_path / "s.zarr", slide_id="S")
    np.testing.assert_allclose(a.obsm["spatial"], truth["xy"] * factor + np.array(shift))
    # hand-placed: the first grid spot (5, 5) in element units
    first = truth["barcodes"].index("bc00")
    np.testing.assert_allclose(a.obsm["spatial"][first], np.array([5.0, 5.0]) * factor + np.array(shift))


def test_a_chosen_image_element_and_mpp_from_the_spot_pitch(store):
    path, truth = store
    a = read_spatialdata(path, slide_id="S", image_element="he_lowres", pitch_um=100.0)
    np.testing.assert_allclose(a.obsm["spatial"], truth["xy"] / 4.0)  # lowres: scale 4 to global
    assert a.uns["gnnst"]["image_path"].endswith("images/he_lowres")
    assert a.uns["gnnst"]["mpp"] == pytest.approx(100.0 / (10.0 / 4.0))  # 10 units = 2.5 lowres px apart
    assert read_spatialdata(path, slide_id="S", mpp=0.5, pitch_um=100.0).uns["gnnst"]["mpp"] == 0.5  # mpp wins


def test_points_element(tmp_path):
    truth = write_spatialdata_store(tmp_path / "p.zarr", as_points=True, spots_transform=_tf("scale2"))
    a = read_spatialdata(tmp_path / "p.zarr", slide_id="P")
    assert list(a.obs_names) == truth["barcodes"]
    np.testing.assert_allclose(a.obsm["spatial"], truth["xy"] * 2.0)


def test_the_image_element_is_read_by_region_lazily(tmp_path):
    truth = write_spatialdata_store(tmp_path / "s.zarr", image_size=(150, 100), chunks=32, lowres=False)
    img = truth["image"]  # [h, w, 3]
    with open_image(tmp_path / "s.zarr" / "images" / "he", pad_value=7) as im:
        assert (im.width, im.height) == (150, 100) and im.mpp is None
        assert im.level_downsamples == (1.0, 2.0)
        np.testing.assert_array_equal(im.read_region(20, 30, 50, 40), img[30:70, 20:70])  # crosses chunk borders
        edge = im.read_region(140, 90, 20, 20)  # reaches past the corner: padded
        np.testing.assert_array_equal(edge[:10, :10], img[90:100, 140:150])
        assert (edge[10:] == 7).all() and (edge[:, 10:] == 7).all()
        half = im.read_region(40, 20, 10, 10, level=1).astype(int)  # level 1: spatialdata's 2x downsampled copy
        np.testing.assert_allclose(half, img[20:40:2, 40:60:2].astype(int), atol=1)
        assert im.thumbnail(50).shape == (33, 50, 3)


def test_errors_name_the_store_and_the_option(tmp_path, store):
    path, _ = store
    with pytest.raises(GnnstError, match="no image element 'nope'.*he, he_lowres"):
        read_spatialdata(path, slide_id="S", image_element="nope")
    with pytest.raises(GnnstError, match="no layers\\['raw'\\]"):
        read_spatialdata(path, slide_id="S", counts_layer="raw")
    with pytest.raises(GnnstError, match="coordinate system 'aligned'"):
        read_spatialdata(path, slide_id="S", coordinate_system="aligned")
    with pytest.raises(GnnstError, match="SpatialData store not found"):
        read_spatialdata(tmp_path / "missing.zarr", slide_id="S")


def test_unmatched_rows_normalised_counts_and_disjoint_coordinate_systems(tmp_path):
    import spatialdata as sd
    from spatialdata.models import TableModel
    from spatialdata.transformations import Identity, set_transformation

    write_spatialdata_store(tmp_path / "s.zarr", lowres=False)
    sdata = sd.read_zarr(tmp_path / "s.zarr")
    table = sdata.tables["table"]
    ids = table.obs["spot_id"].to_numpy().copy()
    ids[0] = 999  # a row whose spot the element lacks
    bad = table.copy()
    bad.obs["spot_id"] = ids
    lognorm = table.copy()
    lognorm.X = np.log1p(lognorm.X)
    moved = sd.SpatialData(images={"he": sdata.images["he"]}, shapes={"spots": sdata.shapes["spots"]},
                           tables={"table": TableModel.parse(bad)})
    moved.write(tmp_path / "unmatched.zarr")
    with pytest.raises(GnnstError, match="has spot_id 999, which element 'spots' lacks.*unmatched: drop"):
        read_spatialdata(tmp_path / "unmatched.zarr", slide_id="S")
    a = read_spatialdata(tmp_path / "unmatched.zarr", slide_id="S", unmatched="drop")
    assert a.n_obs == table.n_obs - 1 and table.obs_names[0] not in a.obs_names

    sd.SpatialData(images={"he": sdata.images["he"]}, shapes={"spots": sdata.shapes["spots"]},
                   tables={"table": TableModel.parse(lognorm)}).write(tmp_path / "log.zarr")
    with pytest.raises(GnnstError, match="is not raw counts.*counts_layer"):
        read_spatialdata(tmp_path / "log.zarr", slide_id="S")

    image = sdata.images["he"]
    set_transformation(image, {"aligned": Identity()}, set_all=True)
    sd.SpatialData(images={"he": image}, shapes={"spots": sdata.shapes["spots"]},
                   tables={"table": sdata.tables["table"]}).write(tmp_path / "apart.zarr")
    with pytest.raises(GnnstError, match="share no coordinate system.*'spots' has global; image 'he' has aligned"):
        read_spatialdata(tmp_path / "apart.zarr", slide_id="S")


def test_manifest_folder_role_with_checksum_and_pitch(tmp_path):
    root = tmp_path / "data"
    truth = write_spatialdata_store(root / "S1.zarr", spots_transform=_tf("scale2"), image_size=(128, 96))
    digest, used = folder_sha256("spatialdata", root / "S1.zarr")
    assert any(p.name == "zarr.json" for p in used) and len(used) > 10
    (tmp_path / "m.yaml").write_text(
        "name: sd\nreader: spatialdata\nscale: {pitch_um: 100}\nslides:\n"
        f"  - slide_id: S1\n    files:\n      zarr: {{path: S1.zarr, sha256: {digest}}}\n")
    m = load_manifest(tmp_path / "m.yaml")
    a = read_slide(m, m.slides[0], data_root=str(root), cache_dir=str(tmp_path / "cache"), download=False,
                   patch_size_um=100.0)
    np.testing.assert_allclose(a.obsm["spatial"], truth["xy"] * 2.0)
    assert a.uns["gnnst"]["mpp"] == pytest.approx(100.0 / 20.0)  # 10 units x 2 = 20 px pitch
    (root / "S1.zarr" / "tables" / "table" / "X" / "extra").write_text("changed")
    with pytest.raises(GnnstError, match="checksum mismatch"):
        read_slide(m, m.slides[0], data_root=str(root), cache_dir=str(tmp_path / "cache"), download=False)


@pytest.mark.parametrize("kind", ["hex", "square"])
def test_spot_pitch_is_robust_to_jittered_positions(tmp_path, kind):
    from gnnst.data.grid import grid_points
    from gnnst.data.readers.spatialdata import _mpp_from_pitch

    xy, _ = grid_points((0, 0, 3000, 3000), pitch_px=100.0, kind=kind)
    jitter = np.random.default_rng(0).normal(scale=6.0, size=xy.shape)  # spot placement noise, 6 % of the pitch
    exact = _mpp_from_pitch(xy, 200.0, store=tmp_path, slide_id="S")
    noisy = _mpp_from_pitch(xy + jitter, 200.0, store=tmp_path, slide_id="S")
    assert exact == pytest.approx(2.0) and noisy == pytest.approx(2.0, rel=0.01)


@pytest.mark.filterwarnings("ignore:SpatialData is not stored in the most current format")
def test_a_store_in_the_older_zarr_v2_format(tmp_path):
    """Stores written by spatialdata < 0.4 (zarr v2, OME-NGFF 0.4 image metadata) read the same."""
    import spatialdata as sd

    formats = pytest.importorskip("spatialdata._io.format")
    truth = write_spatialdata_store(tmp_path / "new.zarr", lowres=False)
    s = sd.read_zarr(tmp_path / "new.zarr")
    sd.SpatialData(images=dict(s.images), shapes=dict(s.shapes), tables=dict(s.tables)).write(
        tmp_path / "old.zarr", sdata_formats=[formats.SpatialDataContainerFormatV01(), formats.RasterFormatV01(),
                                              formats.ShapesFormatV02(), formats.TablesFormatV01()])
    assert (tmp_path / "old.zarr" / "images" / "he" / ".zattrs").is_file()
    a = read_spatialdata(tmp_path / "old.zarr", slide_id="S")
    np.testing.assert_allclose(a.obsm["spatial"], truth["xy"])
    with open_image(a.uns["gnnst"]["image_path"]) as im:
        np.testing.assert_array_equal(im.read_region(3, 4, 40, 30), truth["image"][4:34, 3:43])


def test_a_folder_that_is_no_image(tmp_path):
    with pytest.raises(GnnstError, match="cannot read the OME-Zarr image"):
        open_image(tmp_path)


def test_a_store_without_an_image(tmp_path):
    import spatialdata as sd

    root = tmp_path / "data"
    write_spatialdata_store(tmp_path / "full.zarr", lowres=False)
    s = sd.read_zarr(tmp_path / "full.zarr")
    sd.SpatialData(shapes=dict(s.shapes), tables=dict(s.tables)).write(root / "S1.zarr")
    a = read_spatialdata(root / "S1.zarr", slide_id="S1", mpp=1.0)
    assert a.uns["gnnst"]["image_path"] is None and a.n_obs == 20  # expression only: fine
    (tmp_path / "m.yaml").write_text("name: sd\nreader: spatialdata\nslides:\n"
                                     "  - slide_id: S1\n    files:\n      zarr: {path: S1.zarr}\n")
    m = load_manifest(tmp_path / "m.yaml")
    with pytest.raises(GnnstError, match="slide 'S1' has no image.*no image element"):
        read_slide(m, m.slides[0], data_root=str(root), download=False)
