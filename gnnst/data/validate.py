"""Checks every reader applies to its canonical AnnData before returning it.

The canonical form (see :mod:`gnnst.keys`):

- ``X`` ``[N, G]`` raw counts (``float32``, CSR), also in ``layers['counts']``
- ``obs_names``: spot barcodes, unique; ``obs['slide_id']``
- ``var_names``: gene symbols, made unique as scanpy's ``var_names_make_unique`` does (the second
  ``ERBB2`` becomes ``ERBB2-1``; the counts are not summed), with a warning naming the duplicated genes
- ``obsm['spatial']`` ``[N, 2]`` full-resolution pixel (x, y), float64
- ``uns['gnnst']``: ``{'mpp': float | None, 'image_path': str | None, 'image_scalef': float, 'source': str}``;
  ``mpp`` is micrometres per *full-resolution* pixel; ``image_scalef`` is pixels of the image at
  ``image_path`` per full-resolution pixel (1.0 for the full-resolution image; Space Ranger's
  ``tissue_hires_scalef`` for its hires PNG). Whoever cuts patches or draws on that image reads the
  spots through :func:`image_coordinates`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

log = logging.getLogger("gnnst")
SHOW_NAMES = 10  # names listed in a warning before "..."


def canonicalise(
    adata: "AnnData", *, slide_id: str, source: str, file: str, mpp: float | None, image_path: str | None,
    image_scalef: float = 1.0,
) -> "AnnData":
    """Bring a freshly read AnnData to the canonical form and validate it (in place, returned).

    Args:
        adata: counts in ``X`` and pixel coordinates in ``obsm['spatial']``.
        slide_id: the slide's id, written to ``obs['slide_id']``.
        source: reader name, for ``uns['gnnst']['source']``.
        file: the counts file, named in error messages.
        mpp: micrometres per full-resolution pixel, if known.
        image_path: the image the spots are cut from, if any.
        image_scalef: pixels of that image per full-resolution pixel.
    """
    import pandas as pd
    import scipy.sparse as sp

    if adata.n_obs == 0:
        raise GnnstError(f"{file}: slide '{slide_id}' has no spots")
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
    if not (np.isfinite(image_scalef) and image_scalef > 0):
        raise GnnstError(f"{file}: image scale factor must be positive, got {image_scalef!r} (slide '{slide_id}')")

    adata.obs_names = names
    adata.var_names = unique_gene_names(adata.var_names, file=file)
    adata.X = sp.csr_matrix(X, dtype=np.float32)
    adata.layers[keys.COUNTS] = adata.X.copy()
    adata.obsm[keys.SPATIAL] = xy
    adata.obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * adata.n_obs)
    adata.uns[keys.UNS_GNNST] = {
        keys.MPP: None if mpp is None else float(mpp),
        keys.IMAGE_PATH: None if image_path is None else str(image_path),
        keys.IMAGE_SCALEF: float(image_scalef),
        "source": source,
    }
    return adata


def unique_gene_names(names, *, file: str) -> "pd.Index":
    """``names`` as strings, duplicates suffixed ``-1``, ``-2``, ... as ``var_names_make_unique`` does.

    A warning names the duplicated genes (their counts stay apart: nothing is summed).
    """
    import anndata as ad
    import pandas as pd

    names = pd.Index(pd.Index(names).astype(str), dtype=object)
    dup = names[names.duplicated()].unique()
    if len(dup) == 0:
        return names
    shown = ", ".join(dup[:SHOW_NAMES]) + (", ..." if len(dup) > SHOW_NAMES else "")
    log.warning("%s: %d gene name(s) occur more than once: %s; kept apart and made unique as scanpy's "
                "var_names_make_unique does (%s, %s-1, ...)", file, len(dup), shown, dup[0], dup[0])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pd.Index(ad.utils.make_index_unique(names), dtype=object)


def image_coordinates(adata: "AnnData") -> tuple[np.ndarray, float | None]:
    """Spot centres ``[N, 2]`` in pixels of the image at ``uns['gnnst']['image_path']``, and that
    image's micrometres per pixel (``None`` when ``mpp`` is unknown).

    ``obsm['spatial']`` holds full-resolution pixels; the image may be a downscaled one (Space Ranger's
    hires/lowres PNG), whose ``uns['gnnst']['image_scalef']`` converts between the two.
    """
    meta = adata.uns[keys.UNS_GNNST]
    scale = float(meta.get(keys.IMAGE_SCALEF, 1.0))
    xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64) * scale  # [N, 2] image px
    mpp = meta.get(keys.MPP)
    return xy, None if mpp is None else float(mpp) / scale


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


@contextmanager
def duplicate_names_quiet():
    """Silence anndata's duplicate-name warnings while a reader builds its AnnData: :func:`canonicalise`
    rejects duplicate barcodes and makes gene names unique with a warning that names them."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* names are not unique", category=UserWarning)
        yield
