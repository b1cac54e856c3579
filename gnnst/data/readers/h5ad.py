"""Any ``.h5ad`` with spot pixel coordinates in ``obsm`` to canonical AnnData."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData


def read_h5ad(
    h5ad: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str,
    mpp: float | None = None,
    spatial_key: str = keys.SPATIAL,
    counts_layer: str | None = None,
) -> "AnnData":
    """Read one slide stored as an AnnData ``.h5ad`` file.

    Args:
        h5ad: the ``.h5ad`` file; one row per spot, ``obs_names`` the barcodes.
        image: the full-resolution H&E image the coordinates refer to. Only its path is recorded.
        slide_id: written to ``obs['slide_id']``.
        mpp: micrometres per full-resolution pixel of ``image``; nothing is derived when ``None``.
        spatial_key: ``obsm`` key of the ``[N, 2]`` pixel (x, y) coordinates in ``image``.
        counts_layer: ``layers`` key holding the raw counts; ``None`` takes ``X``, which must then
            hold raw counts (not normalised or log-transformed values: they are not checked).

    Only the counts, ``obs``, ``var`` and the coordinates are carried over; other layers, ``obsm``,
    ``obsp`` and ``uns`` entries are dropped. Returns the canonical AnnData of
    :mod:`gnnst.data.validate`.
    """
    from gnnst.data.validate import canonicalise

    path = Path(h5ad)
    src = load_h5ad(path)
    if counts_layer is None:
        if src.X is None:
            raise GnnstError(f"{path}: has no X matrix; give 'counts_layer' naming the raw-count layer")
        X = src.X
    elif counts_layer not in src.layers:
        raise GnnstError(
            f"{path}: no layers['{counts_layer}'] (counts_layer); layers are: {', '.join(src.layers) or 'none'}"
        )
    else:
        X = src.layers[counts_layer]
    adata = lean_copy(src, X, src.var, file=path, spatial_key=spatial_key)
    return canonicalise(adata, slide_id=slide_id, source="h5ad", file=str(path), mpp=mpp,
                        image_path=None if image is None else str(image))


def load_h5ad(path: Path) -> "AnnData":
    """``anndata.read_h5ad`` with missing or unreadable files raised as :class:`GnnstError`."""
    import anndata as ad

    from gnnst.data.validate import duplicate_names_quiet

    if not path.is_file():
        raise GnnstError(f"file not found: {path}")
    try:
        with duplicate_names_quiet():
            return ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for corrupt input
        raise GnnstError(f"{path}: cannot be read as an .h5ad file ({type(e).__name__}: {e})") from None


def lean_copy(src: "AnnData", X, var: "pd.DataFrame", *, file: Path, spatial_key: str) -> "AnnData":
    """A new AnnData holding only counts ``X`` ``[N, G]``, ``src.obs``, ``var`` and the coordinates.

    Args:
        src: the AnnData as read.
        X: the counts to keep, ``[N, G]`` with ``G == len(var)``.
        var: gene annotations; its index gives the gene names.
        file: named in error messages.
        spatial_key: ``src.obsm`` key of the pixel (x, y) coordinates, copied to ``obsm['spatial']``.
    """
    import anndata as ad

    from gnnst.data.validate import duplicate_names_quiet

    if spatial_key not in src.obsm:
        raise GnnstError(
            f"{file}: no spot coordinates obsm['{spatial_key}'] (obsm keys: {', '.join(src.obsm) or 'none'})"
        )
    try:
        xy = np.asarray(src.obsm[spatial_key], dtype=np.float64)  # [N, 2] pixel (x, y)
    except (TypeError, ValueError) as e:
        raise GnnstError(f"{file}: obsm['{spatial_key}'] is not numeric ({e})") from None
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise GnnstError(f"{file}: obsm['{spatial_key}'] must be [N, 2] pixel (x, y), got shape {xy.shape}")
    if X.shape != (src.n_obs, len(var)):
        raise GnnstError(f"{file}: counts have shape {X.shape}, expected ({src.n_obs}, {len(var)})")
    with duplicate_names_quiet():
        adata = ad.AnnData(X=X, obs=src.obs.copy(), var=var.copy())
    adata.obsm[keys.SPATIAL] = xy
    return adata
