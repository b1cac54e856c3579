"""read_h5ad on tiny hand-written .h5ad files."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from gnnst.data.readers import get_reader
from gnnst.data.readers.h5ad import read_h5ad
from gnnst.errors import GnnstError
from gnnst.io import atomic_write_h5ad

BARCODES = ["s0", "s1", "s2"]
GENES = ["A", "B", "B", "C"]  # the duplicate symbol is made unique
COUNTS = np.array([[0, 1, 2, 0], [3, 0, 0, 4], [5, 6, 0, 0]], dtype=np.float32)
XY = np.array([[10.0, 500.0], [20.5, 600.0], [30.0, 700.25]])  # pixel (x, y)


def write(path, *, counts=COUNTS, barcodes=BARCODES, obsm_key="spatial", **layers):
    with warnings.catch_warnings():  # duplicate gene (and barcode) names are the point of some tests
        warnings.simplefilter("ignore", UserWarning)
        adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame({"region": ["a", "b", "a"]}, index=barcodes),
                           var=pd.DataFrame(index=GENES))
        adata.obsm[obsm_key] = XY
        adata.obsm["X_pca"] = np.zeros((3, 2))
        adata.uns["note"] = "dropped"
        for name, value in layers.items():
            adata.layers[name] = value
        atomic_write_h5ad(adata, path)  # also under pandas 3
    return path


def test_reads_counts_coordinates_and_obs(tmp_path):
    path = write(tmp_path / "s.h5ad", lognorm=np.log1p(COUNTS))
    adata = read_h5ad(path, tmp_path / "he.tif", slide_id="slideA", mpp=0.5)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == ["A", "B", "B-1", "C"]
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS)
    np.testing.assert_array_equal(adata.obsm["spatial"], XY)
    assert adata.obsm["spatial"].dtype == np.float64
    assert list(adata.obs["region"]) == ["a", "b", "a"]
    assert list(adata.obs["slide_id"]) == ["slideA"] * 3
    assert adata.uns == {"gnnst": {"mpp": 0.5, "image_path": str(tmp_path / "he.tif"), "image_scalef": 1.0,
                                   "source": "h5ad"}}
    assert set(adata.layers) == {"counts"} and set(adata.obsm) == {"spatial"}


def test_spatial_key_and_counts_layer(tmp_path):
    path = write(tmp_path / "s.h5ad", counts=np.log1p(COUNTS), obsm_key="pixel_xy", raw_counts=COUNTS)
    adata = read_h5ad(path, slide_id="s", spatial_key="pixel_xy", counts_layer="raw_counts")
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS)
    np.testing.assert_array_equal(adata.obsm["spatial"], XY)
    assert adata.uns["gnnst"]["mpp"] is None and adata.uns["gnnst"]["image_path"] is None


def test_registered():
    assert get_reader("h5ad") is read_h5ad


def test_missing_obsm_key(tmp_path):
    path = write(tmp_path / "s.h5ad")
    with pytest.raises(GnnstError, match=r"no spot coordinates obsm\['pixel_xy'\]") as e:
        read_h5ad(path, slide_id="s", spatial_key="pixel_xy")
    assert str(path) in str(e.value)


def test_missing_counts_layer(tmp_path):
    path = write(tmp_path / "s.h5ad")
    with pytest.raises(GnnstError, match=r"no layers\['counts'\]") as e:
        read_h5ad(path, slide_id="s", counts_layer="counts")
    assert str(path) in str(e.value)


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(GnnstError, match="file not found") as e:
        read_h5ad(tmp_path / "absent.h5ad", slide_id="s")
    assert str(tmp_path / "absent.h5ad") in str(e.value)
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"this is not hdf5")
    with pytest.raises(GnnstError, match="cannot be read as an .h5ad file") as e:
        read_h5ad(bad, slide_id="s")
    assert str(bad) in str(e.value)


def test_nan_count_names_file(tmp_path):
    counts = COUNTS.copy()
    counts[2, 0] = np.nan
    path = write(tmp_path / "s.h5ad", counts=counts)
    with pytest.raises(GnnstError, match="NaN or infinite count at spot 's2', gene 'A'") as e:
        read_h5ad(path, slide_id="s")
    assert str(path) in str(e.value)


def test_duplicate_barcode(tmp_path):
    path = write(tmp_path / "s.h5ad", barcodes=["s0", "s1", "s0"])
    with pytest.raises(GnnstError, match="duplicate spot barcode 's0'") as e:
        read_h5ad(path, slide_id="s")
    assert str(path) in str(e.value)
