"""Checks every reader applies to its canonical AnnData before returning it.

The canonical form (see :mod:`gnnst.keys`):

- ``X`` ``[N, G]`` raw counts (``float32``, CSR), also in ``layers['counts']``
- ``obs_names``: spot barcodes, unique; ``obs['slide_id']``
- ``var_names``: gene symbols, made unique
- ``obsm['spatial']`` ``[N, 2]`` full-resolution pixel (x, y), float64
- ``uns['gnnst']``: ``{'mpp': float | None, 'image_path': str | None, 'source': str}``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData


def canonicalise(
    adata: "AnnData", *, slide_id: str, source: str, file: str, mpp: float | None, image_path: str | None
) -> "AnnData":
    """Bring a freshly read AnnData to the canonical form and validate it (in place, returned).

    Args:
        adata: counts in ``X`` and pixel coordinates in ``obsm['spatial']``.
        slide_id: the slide's id, written to ``obs['slide_id']``.
        source: reader name, for ``uns['gnnst']['source']``.
        file: the counts file, named in error messages.
        mpp: micrometres per full-resolution pixel, if known.
        image_path: the full-resolution image, if any.
    """
    import pandas as pd
    import scipy.sparse as sp

    if adata.n_obs == 0:
        raise GnnstError(f"{file}: slide '{slide_id}' has no spots under tissue")
    names = pd.Index(adata.obs_names.astype(str))
    dup = names[names.duplicated()]
    if len(dup):
        raise GnnstError(f"{file}: duplicate spot barcode '{dup[0]}' in slide '{slide_id}'")
    X = adata.X
    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.size and not np.all(np.isfinite(data)):
        bad = _first_bad(adata, lambda v: ~np.isfinite(v))
        raise GnnstError(f"{file}: NaN or infinite count at spot '{bad[0]}', gene '{bad[1]}' (slide '{slide_id}')")
    if data.size and data.min() < 0:
        bad = _first_bad(adata, lambda v: v < 0)
        raise GnnstError(f"{file}: negative count at spot '{bad[0]}', gene '{bad[1]}' (slide '{slide_id}')")
    if keys.SPATIAL not in adata.obsm:
        raise GnnstError(f"{file}: no spot coordinates (obsm['{keys.SPATIAL}']) for slide '{slide_id}'")
    xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise GnnstError(f"{file}: obsm['{keys.SPATIAL}'] must be [N, 2], got shape {xy.shape}")
    if not np.all(np.isfinite(xy)):
        i = int(np.where(~np.isfinite(xy).all(1))[0][0])
        raise GnnstError(f"{file}: spot '{names[i]}' has a missing (NaN) coordinate in slide '{slide_id}'")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise GnnstError(f"{file}: micrometres per pixel must be positive, got {mpp!r} (slide '{slide_id}')")

    adata.obs_names = names
    adata.var_names = pd.Index(adata.var_names.astype(str))
    adata.var_names_make_unique()
    adata.X = sp.csr_matrix(X, dtype=np.float32)
    adata.layers[keys.COUNTS] = adata.X.copy()
    adata.obsm[keys.SPATIAL] = xy
    adata.obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * adata.n_obs)
    adata.uns[keys.UNS_GNNST] = {
        keys.MPP: None if mpp is None else float(mpp),
        keys.IMAGE_PATH: None if image_path is None else str(image_path),
        "source": source,
    }
    return adata


def _first_bad(adata, pred) -> tuple[str, str]:
    import scipy.sparse as sp

    X = adata.X
    if sp.issparse(X):
        coo = sp.coo_matrix(X)
        j = int(np.where(pred(coo.data))[0][0])
        r, c = coo.row[j], coo.col[j]
    else:
        r, c = (int(v[0]) for v in np.where(pred(np.asarray(X))))
    return str(adata.obs_names[r]), str(adata.var_names[c])
