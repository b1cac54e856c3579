import gzip

import numpy as np
import pytest

from gnnst_testdata import write_legacy_slide
from gnnst.data.readers.legacy_st import read_legacy_st
from gnnst.errors import GnnstError


def _read(root, s="S1"):
    return read_legacy_st(root / f"{s}.tsv.gz", root / f"{s}_selection.tsv", root / f"{s}_HE.jpg", slide_id=s)


def test_reads_canonical_anndata(tmp_path):
    truth = write_legacy_slide(tmp_path, "S1")
    a = _read(tmp_path)
    assert list(a.obs_names) == truth["ids"]  # the unselected spot is dropped
    np.testing.assert_array_equal(a.X.toarray(), truth["counts"])
    np.testing.assert_array_equal(a.layers["counts"].toarray(), truth["counts"])
    assert list(a.var_names) == truth["genes"]
    assert (a.obs["slide_id"] == "S1").all()
    # x is the image column: spot 3x2 sits one pitch right of 2x2
    i, j = a.obs_names.get_loc("2x2"), a.obs_names.get_loc("3x2")
    np.testing.assert_allclose(a.obsm["spatial"][j] - a.obsm["spatial"][i], [40.0, 0.0])
    assert a.uns["gnnst"]["mpp"] == pytest.approx(200.0 / 40.0)
    assert a.uns["gnnst"]["source"] == "legacy_st"


def test_selected_spot_without_counts_is_dropped(tmp_path):
    truth = write_legacy_slide(tmp_path, "S1")
    sel = tmp_path / "S1_selection.tsv"
    sel.write_text(sel.read_text() + "9\t9\t9\t9\t100.0\t100.0\t1\n")
    assert list(_read(tmp_path).obs_names) == truth["ids"]


def _rewrite_counts(root, fn):
    p = root / "S1.tsv.gz"
    lines = gzip.open(p, "rt").read().splitlines()
    with gzip.open(p, "wt") as f:
        f.write("\n".join(fn(lines)) + "\n")


def test_unjoined_spot_id_names_it(tmp_path):
    write_legacy_slide(tmp_path, "S1")
    _rewrite_counts(tmp_path, lambda L: L[:1] + ["77x77" + L[1][L[1].index("\t"):]] + L[2:])
    with pytest.raises(GnnstError, match=r"S1.tsv.gz.*'77x77' does not join"):
        _read(tmp_path)


def test_nan_and_negative_counts(tmp_path):
    write_legacy_slide(tmp_path, "S1")
    _rewrite_counts(tmp_path, lambda L: L[:1] + [L[1].rsplit("\t", 1)[0] + "\tnan"] + L[2:])
    with pytest.raises(GnnstError, match=r"S1.tsv.gz: NaN .*spot '2x2', gene 'G11'"):
        _read(tmp_path)
    write_legacy_slide(tmp_path, "S1")
    _rewrite_counts(tmp_path, lambda L: L[:1] + [L[1].rsplit("\t", 1)[0] + "\t-3"] + L[2:])
    with pytest.raises(GnnstError, match=r"negative count at spot '2x2', gene 'G11'"):
        _read(tmp_path)


def test_duplicate_barcode(tmp_path):
    write_legacy_slide(tmp_path, "S1")
    _rewrite_counts(tmp_path, lambda L: L + [L[1]])
    with pytest.raises(GnnstError, match="duplicate spot barcode '2x2'"):
        _read(tmp_path)


def test_no_spots_under_tissue(tmp_path):
    write_legacy_slide(tmp_path, "S1")
    sel = tmp_path / "S1_selection.tsv"
    lines = sel.read_text().splitlines()
    sel.write_text("\n".join([lines[0]] + [l[: l.rindex("\t")] + "\t0" for l in lines[1:]]) + "\n")
    with pytest.raises(GnnstError, match=r"S1_selection.tsv: no spots under tissue .*column 'selected'"):
        _read(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    write_legacy_slide(tmp_path, "S1")
    (tmp_path / "S1.tsv.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(GnnstError, match="S1.tsv.gz: cannot be read"):
        _read(tmp_path)
    (tmp_path / "S1.tsv.gz").unlink()
    with pytest.raises(GnnstError, match="file not found: .*S1.tsv.gz"):
        _read(tmp_path)
