"""Atomic file writes: every output is written under a temporary name and renamed."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path (not yet created) inside a hidden temporary folder beside ``path`` for a writer that
    makes a folder (a zarr store); move what it wrote to ``path`` only if the block succeeds.

    An existing ``path`` is an error unless ``overwrite``; it is then replaced once the new folder is
    complete. On failure nothing is left behind.
    """
    import shutil

    from gnnst.errors import GnnstError

    path = Path(path)
    if path.exists() and not overwrite:
        raise GnnstError(f"{path} exists; choose another path or overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_dir / path.name
        replaced = tmp_dir / ".replaced"  # the old folder, removed with tmp_dir once the new one is in place
        if path.exists():
            os.replace(path, replaced)
        try:
            os.replace(tmp_dir / path.name, path)
        except BaseException:
            if replaced.exists():
                os.replace(replaced, path)
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def to_json(obj: Any, **kwargs) -> str:
    """``obj`` as strict JSON text (no ``NaN``/``Infinity``): a float that is not finite becomes ``null``
    with its reason under the top-level ``nulls`` (:func:`gnnst.metrics.finite_json`, the one form)."""
    from gnnst.metrics import finite_json

    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (:func:`to_json`) atomically."""
    atomic_write_text(path, to_json(obj, indent=2, sort_keys=False) + "\n")


def file_identity(path: str | Path) -> str:
    """``"<resolved path>:<bytes>:<mtime ns>"``: a file's identity for cache keys when hashing its content
    would cost more than the work it saves (an image, a weights file)."""
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_h5ad(adata, path: str | Path) -> None:
    """Write ``adata`` to ``path`` atomically, the same way under pandas 2 and 3.

    pandas 3 stores strings as its ``str`` dtype (an Arrow- or Python-backed string array), and
    pandas 2 can hold ``pd.StringDtype()`` columns too; anndata refuses to write those unless its
    ``allow_write_nullable_strings`` setting is on, and files written with it cannot be read by
    anndata < 0.11. So every string column, category list and index of ``obs`` and ``var`` is written
    as a plain (object) string array, the encoding every anndata version reads. ``adata`` itself is
    not modified and its matrices are not copied. Anything string-typed elsewhere (e.g. a table in
    ``uns``) is written with ``allow_write_nullable_strings`` where the installed anndata has it.
    """
    import anndata as ad

    raw = None if adata.raw is None else ad.AnnData(X=adata.raw.X, var=_plain_strings(adata.raw.var),
                                                    varm=dict(adata.raw.varm))
    out = ad.AnnData(
        X=adata.X, obs=_plain_strings(adata.obs), var=_plain_strings(adata.var), uns=adata.uns,
        obsm=dict(adata.obsm), varm=dict(adata.varm), layers=dict(adata.layers), obsp=dict(adata.obsp),
        varp=dict(adata.varp), raw=raw,
    )
    override = getattr(ad.settings, "override", None)
    nullable_ok = override is not None and hasattr(ad.settings, "allow_write_nullable_strings")
    with atomic_path(path) as tmp:
        with override(allow_write_nullable_strings=True) if nullable_ok else contextlib.nullcontext():
            out.write_h5ad(tmp)


def _plain_strings(df):
    """A shallow copy of ``df`` whose string columns, categories and index are object arrays."""
    import pandas as pd

    def plain_index(index: pd.Index) -> pd.Index:
        return index.astype(object) if _nullable_string(index.dtype) else index

    out = df.copy(deep=False)
    for col in out.columns:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            cats = plain_index(s.cat.categories)
            if cats is not s.cat.categories:
                out[col] = pd.Categorical.from_codes(s.cat.codes, categories=cats, ordered=s.cat.ordered)
        elif _nullable_string(s.dtype):
            out[col] = s.astype(object).where(s.notna(), None)  # pd.NA / NaN -> None
    out.index = plain_index(out.index)
    return out


def _nullable_string(dtype) -> bool:
    """Whether ``dtype`` is one of pandas' string dtypes (``str``, ``string``, ``string[pyarrow]``)."""
    import pandas as pd

    return dtype != object and pd.api.types.is_string_dtype(dtype) and not isinstance(dtype, pd.CategoricalDtype)
