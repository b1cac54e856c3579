"""Atomic writes; every AnnData gnnst writes survives pandas' nullable string dtypes (issue 11, item 5).

pandas 3 makes every string column and index its ``str`` dtype, which anndata refuses to write by
default; pandas 2 has the same arrays as ``pd.StringDtype()``. The tests convert each AnnData gnnst
produces to those dtypes (as pandas 3 would have made them) and write it with the one writer.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from gnnst_tinyrun import SLIDES, tiny_run  # noqa: F401  (fixture)
from gnnst.io import atomic_write_h5ad

REPO = Path(__file__).resolve().parents[1]


def _string_dtypes() -> list[str]:
    out = ["string"]
    try:
        import pyarrow  # noqa: F401

        out.append("string[pyarrow]")
    except ImportError:
        pass
    return out


def _nullable(index: pd.Index, dtype: str) -> pd.Index:
    return index.astype(dtype) if index.dtype == object else index


def as_nullable_strings(a: ad.AnnData, dtype: str) -> ad.AnnData:
    """``a`` with every string column, category list and index of ``obs``/``var`` in ``dtype``."""
    for df in (a.obs, a.var):
        for col in list(df.columns):
            s = df[col]
            if isinstance(s.dtype, pd.CategoricalDtype) and s.cat.categories.dtype == object:
                df[col] = pd.Categorical.from_codes(s.cat.codes, categories=_nullable(s.cat.categories, dtype))
            elif s.dtype == object:
                df[col] = s.astype(dtype)
    a.obs_names = _nullable(a.obs_names, dtype)
    a.var_names = _nullable(a.var_names, dtype)
    return a


def _roundtrip(a: ad.AnnData, path: Path) -> ad.AnnData:
    before = {k: v.dtype for k, v in a.obs.items()}
    atomic_write_h5ad(a, path)
    assert {k: v.dtype for k, v in a.obs.items()} == before  # the caller's object is left as it was
    b = ad.read_h5ad(path)
    assert list(b.obs_names) == list(map(str, a.obs_names)) and list(b.var_names) == list(map(str, a.var_names))
    def values(s: pd.Series) -> list:
        s = s.astype(object)
        return list(s.where(s.notna(), None))

    for col in a.obs.columns:
        assert values(b.obs[col]) == values(a.obs[col]), col
    np.testing.assert_array_equal(np.asarray(b.X.todense() if hasattr(b.X, "todense") else b.X),
                                  np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X))
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))
    return b


def test_every_anndata_writer_goes_through_atomic_write_h5ad():
    """No other ``.write_h5ad(`` call in the package: each output takes the one pandas-2/3-safe path."""
    calls = [f"{p.relative_to(REPO)}:{i + 1}" for p in (REPO / "gnnst").rglob("*.py") if p.name != "io.py"
             for i, line in enumerate(p.read_text().splitlines()) if re.search(r"\.write_h5ad\(", line)]
    assert calls == []


@pytest.mark.parametrize("dtype", _string_dtypes())
def test_nullable_string_columns_and_index_write_and_read_back(tmp_path, dtype):
    obs = pd.DataFrame({"slide_id": pd.Categorical(["s1", "s1", "s2"]), "note": ["a", None, "c"],
                        "n": [1, 2, 3]}, index=pd.Index(["x", "y", "z"], name="barcode"))
    a = ad.AnnData(X=np.arange(6, dtype=np.float32).reshape(3, 2), obs=obs,
                   var=pd.DataFrame({"gene_ids": ["E1", "E2"]}, index=["G1", "G2"]))
    a.layers["gnnst_pred"] = a.X * 2
    a.raw = a.copy()
    a = as_nullable_strings(a, dtype)
    for values in (a.obs["note"], a.obs_names, a.var["gene_ids"], a.obs["slide_id"].cat.categories):
        assert values.dtype != object and pd.api.types.is_string_dtype(values.dtype)  # (pandas 3: already so)
    with pytest.raises(Exception):  # what anndata does without the writer (so the test can fail)
        with ad.settings.override(allow_write_nullable_strings=False):
            a.write_h5ad(tmp_path / "plain.h5ad")
    b = _roundtrip(a, tmp_path / "out.h5ad")
    assert pd.isna(b.obs["note"].iloc[1]) and b.obs["note"].iloc[2] == "c"
    np.testing.assert_array_equal(b.layers["gnnst_pred"], a.layers["gnnst_pred"])
    np.testing.assert_array_equal(b.raw.X, a.raw.X)


@pytest.mark.parametrize("dtype", _string_dtypes()[:1])
def test_everything_gnnst_writes_survives_nullable_strings(tmp_path, tiny_run, dtype):  # noqa: F811
    """Reader output, a train run's predictions, per-slide and concatenated exports."""
    from gnnst.data.manifest import load_manifest
    from gnnst.data.slides import read_slide
    from gnnst.export.anndata import concat_slides, slide_from_run

    m = load_manifest(tiny_run["manifest"])
    produced = {"read": read_slide(m, m.slides[0], data_root=str(tiny_run["root"]), cache_dir=str(tiny_run["cache"]))}
    s = next(iter(SLIDES))
    produced["prediction"] = ad.read_h5ad(tiny_run["run"] / "predictions" / f"{s}.h5ad")
    exported = {t: slide_from_run(tiny_run["run"], t) for t in SLIDES}
    produced["export"] = exported[s]
    produced["concat"] = concat_slides(exported)
    for name, a in produced.items():
        _roundtrip(as_nullable_strings(a, dtype), tmp_path / f"{name}.h5ad")
