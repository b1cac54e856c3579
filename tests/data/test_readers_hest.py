"""read_hest on a tiny hand-written HEST-1k sample (h5ad + pyramidal tif + metadata json)."""

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile

from gnnst.data.readers import get_reader
from gnnst.data.readers.hest import read_hest
from gnnst.errors import GnnstError
from gnnst.io import atomic_write_h5ad

BARCODES = ["AAAC-1", "AAAG-1", "AACA-1"]
GENES = ["GAPDH", "ACTB"]
COUNTS = np.array([[1, 0], [4, 2], [0, 7]], dtype=np.float32)
XY = np.array([[12.0, 40.0], [50.0, 41.5], [13.0, 60.0]])  # pixel (x, y) in the tif


def write_h5ad(path, *, X=COUNTS, barcodes=BARCODES, spatial=True, uns=None, layers=None, raw=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate barcodes in one test
        adata = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=GENES))
        if raw is not None:  # raw counts over a wider gene panel, as scanpy leaves them
            adata.raw = ad.AnnData(X=sp.csr_matrix(raw), obs=adata.obs,
                                   var=pd.DataFrame(index=GENES + ["MT-CO1"]))
        if spatial:
            adata.obsm["spatial"] = XY
        adata.uns["spatial"] = {"ST": {"scalefactors": {"tissue_downscaled_fullres_scalef": 0.1}}}
        adata.uns.update(uns or {})
        adata.layers.update(layers or {})
        atomic_write_h5ad(adata, path)  # also under pandas 3
    return path


def write_tif(path, *, mpp=0.25, unit="CENTIMETER"):
    """A two-level pyramidal RGB tif with ``mpp`` in its resolution tags (pixels per ``unit``)."""
    per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0, "NONE": 1.0}[unit]
    img = np.full((64, 64, 3), 200, dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for level in range(2):
            res = per_unit / (mpp * 2**level)
            tw.write(img[:: 2**level, :: 2**level], tile=(16, 16), photometric="rgb",
                     subfiletype=1 if level else 0, resolution=(res, res), resolutionunit=unit)
    return path


def write_meta(path, **meta):
    path.write_text(json.dumps({"id": "TENX00", "st_technology": "Visium", **meta}))
    return path


@pytest.fixture
def sample(tmp_path):
    return {
        "h5ad": write_h5ad(tmp_path / "TENX00.h5ad"),
        "image": write_tif(tmp_path / "TENX00.tif", mpp=0.25),
        "metadata": write_meta(tmp_path / "TENX00.json", pixel_size_um_estimated=0.5,
                               pixel_size_um_embedded=0.2),
    }


def test_reads_sample(sample):
    adata = read_hest(sample["h5ad"], sample["image"], slide_id="TENX00", metadata=sample["metadata"])
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == GENES
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS)
    np.testing.assert_array_equal(adata.obsm["spatial"], XY)
    assert list(adata.obs["slide_id"]) == ["TENX00"] * 3
    assert adata.uns == {"gnnst": {"mpp": 0.5, "image_path": str(sample["image"]), "image_scalef": 1.0,
                                   "source": "hest"}}


def test_pixel_size_precedence(tmp_path, sample):
    h5, img = sample["h5ad"], sample["image"]
    def mpp_of(**kw):
        return read_hest(kw.pop("h5ad", h5), kw.pop("image", img), slide_id="s", **kw).uns["gnnst"]["mpp"]

    assert mpp_of(metadata=sample["metadata"], mpp=0.3) == 0.3  # explicit wins
    embedded_only = write_meta(tmp_path / "e.json", pixel_size_um_estimated=None, pixel_size_um_embedded=0.2)
    assert mpp_of(metadata=embedded_only) == 0.2
    no_size = write_meta(tmp_path / "n.json")
    with_uns = write_h5ad(tmp_path / "u.h5ad", uns={"pixel_size_um_estimated": 0.7})
    assert mpp_of(h5ad=with_uns, metadata=no_size) == 0.7
    assert mpp_of(metadata=no_size) == 0.25  # from the tif's tags
    assert mpp_of(image=write_tif(tmp_path / "inch.tif", mpp=0.5, unit="INCH")) == pytest.approx(0.5)
    assert mpp_of(image=write_tif(tmp_path / "none.tif", unit="NONE")) is None
    assert mpp_of(image=write_tif(tmp_path / "72dpi.tif", mpp=25400 / 72, unit="INCH")) is None  # placeholder
    assert mpp_of(image=None) is None


def test_non_integer_x_falls_back_to_counts_layer_then_raw(tmp_path):
    lognorm = np.log1p(COUNTS)
    path = write_h5ad(tmp_path / "l.h5ad", X=lognorm, layers={"counts": sp.csr_matrix(COUNTS)})
    np.testing.assert_array_equal(read_hest(path, slide_id="s").X.toarray(), COUNTS)
    raw = np.c_[COUNTS, [3, 0, 1]]
    path = write_h5ad(tmp_path / "r.h5ad", X=lognorm, raw=raw)
    adata = read_hest(path, slide_id="s")
    np.testing.assert_array_equal(adata.X.toarray(), raw)
    assert list(adata.var_names) == ["GAPDH", "ACTB", "MT-CO1"]
    path = write_h5ad(tmp_path / "n.h5ad", X=lognorm)
    with pytest.raises(GnnstError, match="X is not raw counts") as e:
        read_hest(path, slide_id="s")
    assert str(path) in str(e.value)


def test_registered():
    assert get_reader("hest") is read_hest


def test_missing_files(tmp_path, sample):
    with pytest.raises(GnnstError, match="file not found") as e:
        read_hest(tmp_path / "absent.h5ad", slide_id="s")
    assert str(tmp_path / "absent.h5ad") in str(e.value)
    with pytest.raises(GnnstError, match="file not found") as e:
        read_hest(sample["h5ad"], slide_id="s", metadata=tmp_path / "absent.json")
    assert str(tmp_path / "absent.json") in str(e.value)
    with pytest.raises(GnnstError, match="file not found") as e:
        read_hest(sample["h5ad"], tmp_path / "absent.tif", slide_id="s")  # tags needed: nothing else
    assert str(tmp_path / "absent.tif") in str(e.value)


def test_bad_metadata_value(tmp_path, sample):
    meta = write_meta(tmp_path / "bad.json", pixel_size_um_estimated="n/a")
    with pytest.raises(GnnstError, match="'pixel_size_um_estimated' must be a pixel size") as e:
        read_hest(sample["h5ad"], slide_id="s", metadata=meta)
    assert str(meta) in str(e.value) and "'n/a'" in str(e.value)


def test_missing_spatial(tmp_path):
    path = write_h5ad(tmp_path / "s.h5ad", spatial=False)
    with pytest.raises(GnnstError, match=r"no spot coordinates obsm\['spatial'\]") as e:
        read_hest(path, slide_id="s", mpp=0.5)
    assert str(path) in str(e.value)


def test_nan_count_names_file(tmp_path):
    counts = COUNTS.copy()
    counts[0, 1] = np.nan
    path = write_h5ad(tmp_path / "s.h5ad", X=counts)
    with pytest.raises(GnnstError, match="NaN or infinite count at spot 'AAAC-1', gene 'ACTB'") as e:
        read_hest(path, slide_id="s", mpp=0.5)
    assert str(path) in str(e.value)


def test_duplicate_barcode(tmp_path):
    path = write_h5ad(tmp_path / "s.h5ad", barcodes=["AAAC-1", "AAAC-1", "AACA-1"])
    with pytest.raises(GnnstError, match="duplicate spot barcode 'AAAC-1'") as e:
        read_hest(path, slide_id="s", mpp=0.5)
    assert str(path) in str(e.value)
