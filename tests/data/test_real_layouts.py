"""Data as public sets ship it (issue 11, items 3, 4 and 6): reader options in the manifest, counts
rows that do not join the spot table, duplicate gene symbols in every reader, pitch outliers."""

from __future__ import annotations

import gzip
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from gnnst_testdata import write_legacy_slide, write_manifest
from gnnst.data.manifest import load_manifest
from gnnst.data.slides import read_slide
from gnnst.data.readers.legacy_st import mpp_from_pitch, read_legacy_st
from gnnst.errors import GnnstError
from gnnst.io import atomic_write_h5ad


def _read(root, s="S1", **kw):
    return read_legacy_st(root / f"{s}.tsv.gz", root / f"{s}_selection.tsv", root / f"{s}_HE.jpg", slide_id=s, **kw)


def _add_counts_rows(root, ids, s="S1"):
    """Counts rows for array spots the spot table lacks (as STUtility's count files have)."""
    p = root / f"{s}.tsv.gz"
    lines = gzip.open(p, "rt").read().splitlines()
    values = lines[1][lines[1].index("\t"):]
    with gzip.open(p, "wt") as f:
        f.write("\n".join(lines + [i + values for i in ids]) + "\n")


# --- item 3: reader options, unmatched rows ---------------------------------------------------------
def test_unmatched_counts_rows_error_by_default_and_drop_when_asked(tmp_path, caplog):
    truth = write_legacy_slide(tmp_path, "S1")
    _add_counts_rows(tmp_path, ["40x40", "41x40"])
    with pytest.raises(GnnstError, match=r"S1.tsv.gz: spot id '40x40' does not join the spot file .*S1_selection.tsv "
                                         r"\(2 of 14 counts rows unmatched; reader_options: \{unmatched: drop\}"):
        _read(tmp_path)
    with caplog.at_level(logging.INFO, logger="gnnst"):
        a = _read(tmp_path, unmatched="drop")
    assert list(a.obs_names) == truth["ids"]
    np.testing.assert_array_equal(a.X.toarray(), truth["counts"])
    assert "dropped 2 of 14 counts rows of S1.tsv.gz whose spot id is not in S1_selection.tsv" in caplog.text


def test_reader_options_from_the_manifest(tmp_path, caplog):
    root = tmp_path / "data"
    truth = write_legacy_slide(root, "S1")
    _add_counts_rows(root, ["40x40"])
    m = load_manifest(write_manifest(tmp_path / "m.yaml", {"S1": "P1"}, extra="reader_options: {unmatched: drop}\n"))
    assert m.slides[0].reader_options == {"unmatched": "drop"}
    with caplog.at_level(logging.INFO, logger="gnnst"):
        a = read_slide(m, m.slides[0], data_root=str(root), cache_dir=str(tmp_path / "c"))
    assert list(a.obs_names) == truth["ids"] and "dropped 1 of 13 counts rows" in caplog.text
    # per slide, overriding the default
    text = (tmp_path / "m.yaml").read_text().replace("    patient_id: P1\n",
                                                     "    patient_id: P1\n    reader_options: {unmatched: error}\n")
    (tmp_path / "m.yaml").write_text(text)
    m = load_manifest(tmp_path / "m.yaml")
    with pytest.raises(GnnstError, match="does not join"):
        read_slide(m, m.slides[0], data_root=str(root), cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("options, message", [
    ("{unmached: drop}", r"m.yaml: slide 'S1' reader_options: reader 'legacy_st' has no option 'unmached' "
                         r"\(options: unmatched\)"),
    ("{unmatched: keep}", r"m.yaml: slide 'S1' reader_options: option 'unmatched' must be 'error' or 'drop', "
                          r"got 'keep'"),
    ("{mpp: 0.5}", r"no option 'mpp' \(set it under 'scale'"),
    ("[drop]", r"'slides\[0\].reader_options' must be a mapping"),
])
def test_bad_reader_options_are_refused_at_load(tmp_path, options, message):
    p = write_manifest(tmp_path / "m.yaml", {"S1": "P1"})
    p.write_text(p.read_text().replace("    patient_id: P1\n", f"    patient_id: P1\n    reader_options: {options}\n"))
    with pytest.raises(GnnstError, match=message):
        load_manifest(p)


def test_option_types_and_file_roles_are_checked_at_load(tmp_path):
    def manifest(reader, files, options="{}"):
        p = tmp_path / "m.yaml"
        p.write_text(f"name: x\nslides:\n  - slide_id: A\n    reader: {reader}\n    reader_options: {options}\n"
                     f"    files: {files}\n")
        return p

    with pytest.raises(GnnstError, match="option 'in_tissue_only' must be true or false, got 'yes'"):
        load_manifest(manifest("spaceranger", "{outs: o}", "{in_tissue_only: 'yes'}"))
    with pytest.raises(GnnstError, match="option 'spot_diameter_um' must be a positive number, got -1"):
        load_manifest(manifest("spaceranger", "{outs: o}", "{spot_diameter_um: -1}"))
    with pytest.raises(GnnstError, match="option 'counts_layer' must be a string, got 3"):
        load_manifest(manifest("h5ad", "{h5ad: a.h5ad}", "{counts_layer: 3}"))
    with pytest.raises(GnnstError, match=r"m.yaml: slide 'A': reader 'legacy_st' has no file role 'outs' "
                                         r"\(roles: counts, spots, image\)"):
        load_manifest(manifest("legacy_st", "{counts: c.tsv, spots: s.tsv, outs: o}"))
    with pytest.raises(GnnstError, match="reader 'legacy_st' needs file role 'spots'"):
        load_manifest(manifest("legacy_st", "{counts: c.tsv}"))
    m = load_manifest(manifest("hest", "{h5ad: a.h5ad, image: a.tif, metadata: a.json}"))
    assert set(m.slides[0].files) == {"h5ad", "image", "metadata"}


def test_h5ad_counts_layer_from_the_manifest(tmp_path):
    X = np.array([[1, 0], [2, 3], [0, 4]], dtype=np.float32)
    a = ad.AnnData(X=np.log1p(X), obs=pd.DataFrame(index=["a", "b", "c"]), var=pd.DataFrame(index=["G1", "G2"]))
    a.layers["raw_counts"] = sp.csr_matrix(X)
    a.obsm["spatial"] = np.array([[10.0, 10.0], [20.0, 10.0], [10.0, 20.0]])
    atomic_write_h5ad(a, tmp_path / "s.h5ad")
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "he.png")
    p = tmp_path / "m.yaml"
    p.write_text("name: x\nreader: h5ad\nscale: {mpp: 1.0}\nslides:\n  - slide_id: A\n"
                 "    reader_options: {counts_layer: raw_counts}\n    files: {h5ad: s.h5ad, image: he.png}\n")
    m = load_manifest(p)
    out = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(out.X.toarray(), X)


def test_selected_spots_without_counts_are_counted(tmp_path, caplog):
    truth = write_legacy_slide(tmp_path, "S1")
    sel = tmp_path / "S1_selection.tsv"
    sel.write_text(sel.read_text() + "9\t9\t9\t9\t100.0\t100.0\t1\n8\t9\t8\t9\t60.0\t100.0\t1\n")
    with caplog.at_level(logging.INFO, logger="gnnst"):
        a = _read(tmp_path)
    assert list(a.obs_names) == truth["ids"]
    assert "slide S1: 2 of 14 selected spots of S1_selection.tsv have no counts row in S1.tsv.gz" in caplog.text


def test_no_selected_spot_with_counts_names_the_selected_column(tmp_path):
    write_legacy_slide(tmp_path, "S1")
    p = tmp_path / "S1.tsv.gz"
    lines = gzip.open(p, "rt").read().splitlines()
    with gzip.open(p, "wt") as f:  # counts only for the unselected spot
        f.write("\n".join([lines[0], "30x30" + lines[1][lines[1].index("\t"):]]) + "\n")
    with pytest.raises(GnnstError, match=r"none of the 12 spots under tissue \(selected == 1 in .*S1_selection.tsv\) "
                                         r"has a counts row"):
        _read(tmp_path)


def test_spaceranger_unmatched_barcodes_drop(tmp_path, caplog):
    from test_readers_spaceranger import make_outs

    from gnnst.data.readers.spaceranger import read_spaceranger

    outs = make_outs(tmp_path, barcodes=["AAAC-1", "AAAG-1", "GGGG-1", "AACA-1"])
    with pytest.raises(GnnstError, match=r"'GGGG-1' has no row .*reader_options: \{unmatched: drop\}"):
        read_spaceranger(outs, slide_id="s1")
    with caplog.at_level(logging.INFO, logger="gnnst"):
        a = read_spaceranger(outs, slide_id="s1", unmatched="drop")
    assert list(a.obs_names) == ["AAAC-1", "AAAG-1", "AACA-1"]
    assert "dropped 1 of 4 matrix barcodes" in caplog.text


def test_spaceranger_no_spot_in_tissue_names_the_in_tissue_column(tmp_path):
    from test_readers_spaceranger import make_outs

    from gnnst.data.readers.spaceranger import read_spaceranger

    outs = make_outs(tmp_path)
    pos = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
    pos["in_tissue"] = 0
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(GnnstError, match=r"tissue_positions.csv: no spots under tissue in slide 's1': .*"
                                         r"column 'in_tissue'"):
        read_spaceranger(outs, slide_id="s1")


# --- item 4: duplicate gene symbols ---------------------------------------------------------------
def _expect_unique(a, caplog, genes):
    assert list(a.var_names) == genes
    assert "gene name(s) occur more than once: ERBB2;" in caplog.text
    assert "(ERBB2, ERBB2-1, ...)" in caplog.text


def test_duplicate_symbols_legacy_tsv(tmp_path, caplog):
    """pandas would rename the second column ERBB2.1; the header is read as written."""
    truth = write_legacy_slide(tmp_path, "S1", genes=3)
    p = tmp_path / "S1.tsv.gz"
    lines = gzip.open(p, "rt").read().splitlines()
    with gzip.open(p, "wt") as f:
        f.write("\n".join(["\tERBB2\tGAPDH\tERBB2"] + lines[1:]) + "\n")
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        a = _read(tmp_path)
    _expect_unique(a, caplog, ["ERBB2", "GAPDH", "ERBB2-1"])
    np.testing.assert_array_equal(a.X.toarray(), truth["counts"])  # kept apart, not summed


def test_header_without_row_id_field(tmp_path):
    """R's write.table header: one field fewer than the rows."""
    truth = write_legacy_slide(tmp_path, "S1", genes=3)
    p = tmp_path / "S1.tsv.gz"
    lines = gzip.open(p, "rt").read().splitlines()
    with gzip.open(p, "wt") as f:
        f.write("\n".join(["A\tB\tC"] + lines[1:]) + "\n")
    a = _read(tmp_path)
    assert list(a.var_names) == ["A", "B", "C"]
    np.testing.assert_array_equal(a.X.toarray(), truth["counts"])
    with gzip.open(p, "wt") as f:
        f.write("\n".join(["A\tB"] + lines[1:]) + "\n")
    with pytest.raises(GnnstError, match="S1.tsv.gz: the header names 2 genes but the rows have 3 values"):
        _read(tmp_path)


def test_duplicate_symbols_spaceranger(tmp_path, caplog):
    from test_readers_spaceranger import FEATURES, make_outs

    from gnnst.data.readers.spaceranger import read_spaceranger

    feats = [(i, "ERBB2" if n == "ACTB" else n, t) for i, n, t in FEATURES]
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        a = read_spaceranger(make_outs(tmp_path, features=feats), slide_id="s1")
    _expect_unique(a, caplog, ["GAPDH", "ERBB2", "ERBB2-1"])
    assert list(a.var["gene_ids"]) == ["ENSG01", "ENSG02", "ENSG03"]


@pytest.mark.parametrize("reader", ["h5ad", "hest"])
def test_duplicate_symbols_h5ad_and_hest(tmp_path, caplog, reader):
    from gnnst.data.readers import get_reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = ad.AnnData(X=sp.csr_matrix(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)),
                       obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["ERBB2", "KRT19", "ERBB2"]))
        a.obsm["spatial"] = np.array([[1.0, 1.0], [2.0, 2.0]])
        atomic_write_h5ad(a, tmp_path / "s.h5ad")
    with caplog.at_level(logging.WARNING, logger="gnnst"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # anndata's own unnamed warning is not repeated
        out = get_reader(reader)(tmp_path / "s.h5ad", slide_id="s", mpp=1.0)
    _expect_unique(out, caplog, ["ERBB2", "KRT19", "ERBB2-1"])


# --- item 6: pitch outliers -----------------------------------------------------------------------
def test_pitch_outlier_is_named_and_does_not_shift_mpp(tmp_path, caplog):
    write_legacy_slide(tmp_path, "S1", grid=(5, 4))  # pitch 40 px = 200 µm: mpp 5
    sel = tmp_path / "S1_selection.tsv"
    t = pd.read_csv(sel, sep="\t")
    i = t.index[(t.x == 4) & (t.y == 3)][0]
    t.loc[i, ["pixel_x", "pixel_y"]] += [35.0, 25.0]  # ~1 pitch off its array position
    t.to_csv(sel, sep="\t", index=False)
    sel_spots = t[t.selected == 1]
    naive = np.linalg.lstsq(np.c_[sel_spots.x, sel_spots.y, np.ones(len(sel_spots))],
                            sel_spots[["pixel_x", "pixel_y"]].to_numpy(float), rcond=None)[0]
    assert abs(200.0 / ((np.linalg.norm(naive[0]) + np.linalg.norm(naive[1])) / 2) - 5.0) > 0.01  # it would shift
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        a = _read(tmp_path)
    assert a.uns["gnnst"]["mpp"] == pytest.approx(5.0, rel=1e-9)
    assert "1 spot(s) whose pixel position does not fit their array position" in caplog.text
    assert "4x3 (1.08 steps off)" in caplog.text
    assert "4x3" in a.obs_names  # flagged, not dropped


def test_regular_grid_flags_nothing_and_chaos_is_an_error(caplog):
    ax, ay = np.meshgrid(np.arange(6), np.arange(5))
    ax, ay = ax.ravel(), ay.ravel()
    px = np.c_[100 + 40.0 * ax, 50 + 40.0 * ay]
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        assert mpp_from_pitch(ax, ay, px, 200.0) == pytest.approx(5.0)
    assert caplog.text == ""
    rng = np.random.default_rng(0)
    with pytest.raises(GnnstError, match="do not follow their array positions"):
        mpp_from_pitch(ax, ay, rng.uniform(0, 1000, size=(len(ax), 2)), 200.0, where="x.tsv")
