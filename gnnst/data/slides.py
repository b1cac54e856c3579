"""One manifest slide read into gnnst's canonical AnnData: its files resolved and checked
(:mod:`gnnst.data.manifest`), then its reader run (:mod:`gnnst.data.readers`).

Above both: the manifest consults the readers' registry when it is parsed, and reading a slide needs
the manifest's resolved files, so this step lives in a module of its own.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData


def read_slide(manifest, slide, *, data_root: str | None = None, cache_dir: str | None = None,
               download: bool = True, patch_size_um: float | None = None, need_image: bool = True):
    """Canonical AnnData of one manifest slide: its files resolved (and checked), then its reader run
    with the slide's ``scale`` and ``reader_options``.

    Also checks that the slide has an image (when ``need_image``; the error names the slide and the
    manifest) and that every spot lies on it (reading only the image header). With ``patch_size_um``
    it logs the image read and the patch side in its pixels, and warns when that side is under
    :data:`MIN_PATCH_PX`.
    """
    from gnnst.data.manifest import resolve_files
    from gnnst.data.readers import get_reader, image_size, log_patch_size
    from gnnst.data.validate import image_coordinates

    files = resolve_files(manifest, slide, data_root=data_root, cache_dir=cache_dir, download=download)
    kwargs = dict(slide.reader_options)
    if slide.mpp is not None:
        kwargs["mpp"] = slide.mpp
    if slide.pitch_um is not None and "pitch_um" in inspect.signature(get_reader(slide.reader)).parameters:
        kwargs["pitch_um"] = slide.pitch_um
    adata = get_reader(slide.reader)(**{k: str(v) for k, v in files.items()}, slide_id=slide.slide_id, **kwargs)
    adata.obs["patient_id"] = slide.patient_id if slide.patient_id is not None else slide.slide_id
    meta = adata.uns[keys.UNS_GNNST]
    if not meta.get(keys.IMAGE_PATH):
        if need_image:
            if slide.reader == "spatialdata":
                raise GnnstError(f"{manifest.path}: slide '{slide.slide_id}' has no image to cut patches from: its "
                                 f"SpatialData store has no image element (images/)")
            raise GnnstError(f"{manifest.path}: slide '{slide.slide_id}' has no image to cut patches from: give "
                             f"'files.image' (the H&E the spot pixels refer to)"
                             + (", or an outs/ folder with spatial/tissue_hires_image.png"
                                if slide.reader == "spaceranger" else ""))
        return adata
    from gnnst.data.patches import check_inside

    w, h = image_size(meta[keys.IMAGE_PATH])
    xy, image_mpp = image_coordinates(adata)
    check_inside(xy, w, h, slide_id=slide.slide_id, barcodes=adata.obs_names)
    if patch_size_um is not None:
        log_patch_size(adata, patch_size_um, manifest_path=manifest.path, size=(w, h))
    return adata


def spots_anndata(pixel_xy: np.ndarray, barcodes: list[str], *, slide_id: str, mpp: float,
                  image: "str | Path", image_scalef: float = 1.0) -> "AnnData":
    """Canonical AnnData of spots without expression: ``obsm['spatial']``, ``obs['slide_id']``, ``uns['gnnst']``
    (``image_scalef``: pixels of ``image`` per full-resolution pixel)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    a = ad.AnnData(X=sp.csr_matrix((len(barcodes), 0), dtype=np.float32),
                   obs=pd.DataFrame(index=pd.Index(barcodes, name=keys.BARCODE)))
    a.obsm[keys.SPATIAL] = np.asarray(pixel_xy, dtype=np.float64)
    a.obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * len(barcodes))
    a.uns[keys.UNS_GNNST] = {keys.MPP: float(mpp), keys.IMAGE_PATH: str(image), keys.IMAGE_SCALEF: float(image_scalef)}
    return a
