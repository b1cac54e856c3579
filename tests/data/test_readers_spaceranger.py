"""read_spaceranger on tiny hand-written Space Ranger outs/ directories."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from gnnst.data.readers import get_reader
from gnnst.data.readers.spaceranger import read_spaceranger
from gnnst.errors import GnnstError
from gnnst_testdata import write_10x_h5

BARCODES = ["AAAC-1", "AAAG-1", "AAAT-1", "AACA-1"]  # matrix columns; AAAT-1 is outside tissue
FEATURES = [  # id, name, feature_type; the duplicate symbol is made unique, the antibody dropped
    ("ENSG01", "GAPDH", "Gene Expression"),
    ("ENSG02", "ACTB", "Gene Expression"),
    ("ENSG03", "ACTB", "Gene Expression"),
    ("CD3", "CD3_TotalSeqB", "Antibody Capture"),
]
COUNTS = np.array([  # [barcodes, features]
    [1, 0, 3, 9],
    [0, 2, 0, 9],
    [5, 5, 5, 9],
    [0, 0, 7, 9],
], dtype=np.int32)
# barcode, in_tissue, array_row, array_col, pxl_row_in_fullres (y), pxl_col_in_fullres (x);
# AACC-1 is a spot the matrix does not have
POSITIONS = [
    ("AAAC-1", 1, 0, 0, 1000, 2000),
    ("AAAG-1", 1, 0, 2, 1010, 2200),
    ("AAAT-1", 0, 1, 1, 1100, 2100),
    ("AACA-1", 1, 2, 0, 1200, 2010),
    ("AACC-1", 0, 2, 2, 1210, 2210),
]
KEPT = ["AAAC-1", "AAAG-1", "AACA-1"]
KEPT_XY = np.array([[2000.0, 1000.0], [2200.0, 1010.0], [2010.0, 1200.0]])  # (x = col, y = row)
KEPT_COUNTS = np.array([[1, 0, 3], [0, 2, 0], [0, 0, 7]], dtype=np.float32)  # gene expression only


def write_h5(path, counts=COUNTS, barcodes=BARCODES, features=FEATURES):
    """The 10x feature-barcode HDF5 layout (gnnst_testdata.write_10x_h5)."""
    write_10x_h5(path, counts, barcodes, features)


def write_mtx(folder, counts=COUNTS, barcodes=BARCODES, features=FEATURES):
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(counts.T))  # features x barcodes
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.write("".join(b + "\n" for b in barcodes))
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        f.write("".join("\t".join(fe) + "\n" for fe in features))


def write_positions(spatial, fmt, rows=POSITIONS):
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    table = pd.DataFrame(rows, columns=cols)
    if fmt == "csv":
        table.to_csv(spatial / "tissue_positions.csv", index=False)
    elif fmt == "list":
        table.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    else:
        table.to_parquet(spatial / "tissue_positions.parquet", index=False)


def make_outs(root, *, matrix="h5", positions="csv", scalefactors=None, **kw):
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    if matrix == "h5":
        write_h5(outs / "filtered_feature_bc_matrix.h5", **kw)
    else:
        write_mtx(outs / "filtered_feature_bc_matrix", **kw)
    write_positions(outs / "spatial", positions)
    if scalefactors is None:
        scalefactors = {"spot_diameter_fullres": 110.0, "tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.03}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    return outs


@pytest.mark.parametrize("positions", ["csv", "list", "parquet"])
@pytest.mark.parametrize("matrix", ["h5", "mtx"])
def test_reads_counts_positions_and_mpp(tmp_path, matrix, positions):
    outs = make_outs(tmp_path, matrix=matrix, positions=positions)
    adata = read_spaceranger(outs, tmp_path / "he.tif", slide_id="s1")
    assert list(adata.obs_names) == KEPT
    np.testing.assert_array_equal(adata.obsm["spatial"], KEPT_XY)
    assert adata.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(adata.X.toarray(), KEPT_COUNTS)
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), KEPT_COUNTS)
    assert list(adata.var_names) == ["GAPDH", "ACTB", "ACTB-1"]
    assert list(adata.var["gene_ids"]) == ["ENSG01", "ENSG02", "ENSG03"]
    assert list(adata.obs["array_row"]) == [0, 0, 2]
    assert list(adata.obs["array_col"]) == [0, 2, 0]
    assert list(adata.obs["slide_id"]) == ["s1"] * 3
    assert adata.uns["gnnst"] == {"mpp": 55.0 / 110.0, "image_path": str(tmp_path / "he.tif"),
                                  "image_scalef": 1.0, "source": "spaceranger"}


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_h5_fixture_matches_scanpy(tmp_path):
    sc = pytest.importorskip("scanpy")
    outs = make_outs(tmp_path)
    ref = sc.read_10x_h5(outs / "filtered_feature_bc_matrix.h5")  # gene expression only
    adata = read_spaceranger(outs, slide_id="s1", in_tissue_only=False)
    assert list(adata.obs_names) == list(ref.obs_names)
    assert list(adata.var["gene_ids"]) == list(ref.var["gene_ids"])
    np.testing.assert_array_equal(adata.X.toarray(), ref.X.toarray())


def test_in_tissue_only_false_keeps_every_matrix_barcode(tmp_path):
    adata = read_spaceranger(make_outs(tmp_path), slide_id="s1", in_tissue_only=False)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.obs["in_tissue"]) == [1, 1, 0, 1]
    np.testing.assert_array_equal(adata.obsm["spatial"][2], [2100.0, 1100.0])


def test_mpp_sources(tmp_path):
    outs = make_outs(tmp_path / "a")
    assert read_spaceranger(outs, slide_id="s", mpp=0.25).uns["gnnst"]["mpp"] == 0.25
    assert read_spaceranger(outs, slide_id="s", spot_diameter_um=65.0).uns["gnnst"]["mpp"] == 65.0 / 110.0
    hd = make_outs(tmp_path / "b", scalefactors={"spot_diameter_fullres": 29.2, "bin_size_um": 8.0,
                                                 "microns_per_pixel": 0.2738})
    assert read_spaceranger(hd, slide_id="s").uns["gnnst"]["mpp"] == 0.2738
    (outs / "spatial" / "scalefactors_json.json").unlink()
    assert read_spaceranger(outs, slide_id="s").uns["gnnst"]["mpp"] is None


def test_registered():
    assert get_reader("spaceranger") is read_spaceranger


def test_barcode_missing_from_positions(tmp_path):
    outs = make_outs(tmp_path, barcodes=["AAAC-1", "AAAG-1", "GGGG-1", "AACA-1"])
    with pytest.raises(GnnstError) as e:
        read_spaceranger(outs, slide_id="s1")
    msg = str(e.value)
    assert "'GGGG-1'" in msg
    assert str(outs / "filtered_feature_bc_matrix.h5") in msg
    assert str(outs / "spatial" / "tissue_positions.csv") in msg


def test_duplicate_barcode(tmp_path):
    outs = make_outs(tmp_path, barcodes=["AAAC-1", "AAAG-1", "AAAG-1", "AACA-1"])
    with pytest.raises(GnnstError, match="duplicate spot barcode 'AAAG-1'"):
        read_spaceranger(outs, slide_id="s1")


def test_nan_count_names_file(tmp_path):
    counts = COUNTS.astype(np.float32)
    counts[1, 1] = np.nan
    outs = make_outs(tmp_path, counts=counts)
    with pytest.raises(GnnstError, match="NaN") as e:
        read_spaceranger(outs, slide_id="s1")
    assert str(outs / "filtered_feature_bc_matrix.h5") in str(e.value)
    assert "'AAAG-1'" in str(e.value) and "'ACTB'" in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(GnnstError, match="outs directory not found"):
        read_spaceranger(tmp_path / "nope", slide_id="s1")
    outs = make_outs(tmp_path)
    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(GnnstError, match="tissue_positions_list.csv"):
        read_spaceranger(outs, slide_id="s1")
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(GnnstError, match="filtered_feature_bc_matrix"):
        read_spaceranger(outs, slide_id="s1")


def test_corrupt_inputs(tmp_path):
    outs = make_outs(tmp_path)
    (outs / "spatial" / "scalefactors_json.json").write_text('{"spot_diameter_fullres": 0}')
    with pytest.raises(GnnstError, match="'spot_diameter_fullres' must be a positive number, got 0"):
        read_spaceranger(outs, slide_id="s1")
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5")
    with pytest.raises(GnnstError, match="cannot be read as a 10x feature-barcode HDF5"):
        read_spaceranger(outs, slide_id="s1")
