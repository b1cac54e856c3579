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


@pytest.mark.parametrize("variant", ["plain", "quoted", "no_id_label", "na_marker", "blank_last_line"])
def test_counts_fast_parse_equals_pandas(tmp_path, variant, monkeypatch):
    """The numpy fast path and the pandas reading give the same table (ids, genes, values), and a
    table the fast path cannot parse (an NA marker) is read by pandas."""
    from gnnst.data.readers import legacy_st

    rng = np.random.default_rng(0)
    values = rng.poisson(2.0, size=(5, 4)).astype(float)
    ids, genes = [f"{i}x{i + 1}" for i in range(5)], ["A", "B", "ERBB2", "ERBB2"]
    q = (lambda s: f'"{s}"') if variant == "quoted" else str
    head = ([] if variant == "no_id_label" else [q("")]) + [q(g) for g in genes]
    rows = [[q(i)] + [f"{v:g}" for v in r] for i, r in zip(ids, values)]
    if variant == "na_marker":
        rows[2][3] = "NA"
        values[2, 2] = np.nan
    text = "\n".join("\t".join(r) for r in [head] + rows) + ("\n\n" if variant == "blank_last_line" else "\n")
    p = tmp_path / "c.tsv.gz"
    p.write_bytes(gzip.compress(text.encode()))
    fast = legacy_st._read_counts_numeric(p)
    assert (fast is None) == (variant == "na_marker")
    got = legacy_st._read_counts(p)
    monkeypatch.setattr(legacy_st, "_read_counts_numeric", lambda path: None)
    ref = legacy_st._read_counts(p)
    for t in (got, ref):
        assert list(t.index) == ids and list(t.columns) == genes
        np.testing.assert_array_equal(t.to_numpy(np.float64), values)


def test_counts_short_row_reads_as_pandas_does(tmp_path):
    """A row with fewer values than genes is left to pandas (missing values NaN, flagged later by
    canonicalise); a row with more is an error naming the file."""
    from gnnst.data.readers.legacy_st import _read_counts

    p = tmp_path / "c.tsv"
    p.write_text("\tA\tB\n1x1\t1\t2\n1x2\t3\n")
    t = _read_counts(p)
    np.testing.assert_array_equal(t.to_numpy(), [[1.0, 2.0], [3.0, np.nan]])
    p.write_text("\tA\tB\n1x1\t1\t2\n1x2\t3\t4\t5\n")
    with pytest.raises(GnnstError, match=r"c.tsv: cannot be read as a tab-separated table"):
        _read_counts(p)
