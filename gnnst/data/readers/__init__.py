"""Readers: one function per source, each returning the canonical AnnData of
:mod:`gnnst.data.validate`. The manifest's ``reader`` field names one of :data:`READERS`; its
``files`` roles are the reader's path arguments.
"""

from __future__ import annotations

import importlib
from typing import Callable

from gnnst.errors import GnnstError

# reader name -> "module:function"; imported lazily so `import gnnst` stays light
READERS: dict[str, str] = {
    "legacy_st": "gnnst.data.readers.legacy_st:read_legacy_st",
    "spaceranger": "gnnst.data.readers.spaceranger:read_spaceranger",
    "hest": "gnnst.data.readers.hest:read_hest",
    "h5ad": "gnnst.data.readers.h5ad:read_h5ad",
}


def get_reader(name: str) -> Callable:
    """The reader function registered under ``name``."""
    if name not in READERS:
        raise GnnstError(f"unknown reader '{name}' (known: {', '.join(sorted(READERS))})")
    mod, fn = READERS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def read_slide(manifest, slide, *, data_root: str | None = None, cache_dir: str | None = None,
               download: bool = True):
    """Canonical AnnData of one manifest slide: its files resolved (and checked), then its reader run.

    Also checks that the image exists and that every spot lies on it (reading only the image header).
    """
    from gnnst import keys
    from gnnst.data.manifest import resolve_files

    files = resolve_files(manifest, slide, data_root=data_root, cache_dir=cache_dir, download=download)
    kwargs = {}
    if slide.mpp is not None:
        kwargs["mpp"] = slide.mpp
    if slide.pitch_um is not None and slide.reader == "legacy_st":
        kwargs["pitch_um"] = slide.pitch_um
    try:
        adata = get_reader(slide.reader)(**{k: str(v) for k, v in files.items()}, slide_id=slide.slide_id, **kwargs)
    except TypeError as e:
        raise GnnstError(f"{manifest.path}: slide '{slide.slide_id}' files {sorted(files)} do not fit reader "
                         f"'{slide.reader}' ({e})") from None
    adata.obs["patient_id"] = slide.patient_id if slide.patient_id is not None else slide.slide_id
    meta = adata.uns[keys.UNS_GNNST]
    if meta.get(keys.IMAGE_PATH):
        from gnnst.data.patches import check_inside

        w, h = image_size(meta[keys.IMAGE_PATH])
        check_inside(adata.obsm[keys.SPATIAL], w, h, slide_id=slide.slide_id, barcodes=adata.obs_names)
    return adata


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding it."""
    from pathlib import Path

    from gnnst.data.images import PIL_SUFFIXES

    p = Path(path)
    if not p.is_file():
        raise GnnstError(f"image file not found: {p}")
    try:
        if p.suffix.lower() in PIL_SUFFIXES:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None
            with Image.open(p) as im:
                return im.size
        import openslide

        with openslide.OpenSlide(str(p)) as s:
            return s.dimensions
    except GnnstError:
        raise
    except Exception as e:
        raise GnnstError(f"{p}: cannot read the image ({type(e).__name__}: {e})") from None
