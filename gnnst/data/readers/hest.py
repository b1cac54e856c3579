"""HEST-1k samples (``st/<id>.h5ad`` + ``wsis/<id>.tif`` + ``metadata/<id>.json``) to canonical AnnData."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

# pixel-size keys of HEST's per-sample metadata, most trusted first
METADATA_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
UNS_MPP_KEYS = (*METADATA_MPP_KEYS, "pixel_size")  # the same, looked up in adata.uns
MICROMETRES_PER_UNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}  # TIFF ResolutionUnit: inch, cm, mm, µm
# TIFF resolutions outside this range (µm/px) are placeholders such as 72 dpi, not a scan's pixel size
TIFF_MPP_RANGE = (0.01, 20.0)


def read_hest(
    h5ad: str | Path,
    image: str | Path | None = None,
    metadata: str | Path | None = None,
    *,
    slide_id: str,
    mpp: float | None = None,
) -> "AnnData":
    """Read one HEST-1k sample.

    Args:
        h5ad: the sample's ``st/<id>.h5ad``; ``obsm['spatial']`` holds full-resolution pixel (x, y)
            in ``image``. Counts come from ``X`` when it holds integers, else from
            ``layers['counts']`` or ``.raw`` (the first holding integers).
        image: the sample's pyramidal ``wsis/<id>.tif``.
        metadata: HEST's per-sample metadata JSON (``metadata/<id>.json``).
        slide_id: written to ``obs['slide_id']``.
        mpp: micrometres per full-resolution pixel; overrides everything below. When ``None`` it is
            taken from, in order: ``metadata`` (``pixel_size_um_estimated``, then
            ``pixel_size_um_embedded``); the same keys or ``pixel_size`` in ``adata.uns``; the
            resolution tags of ``image`` (``XResolution`` with ``ResolutionUnit`` inch or centimetre,
            ignored outside 0.01-20 µm/px); else it stays ``None``. ``image`` is opened only for this
            last step.

    Only the counts, ``obs``, ``var`` and ``obsm['spatial']`` are carried over. Returns the canonical
    AnnData of :mod:`gnnst.data.validate`.
    """
    from gnnst.data.readers.h5ad import lean_copy, load_h5ad
    from gnnst.data.validate import canonicalise

    path = Path(h5ad)
    src = load_h5ad(path)
    X, var = _raw_counts(src, path)
    adata = lean_copy(src, X, var, file=path, spatial_key=keys.SPATIAL)
    if mpp is None and metadata is not None:
        mpp = _mpp_from_metadata(Path(metadata))
    if mpp is None:
        mpp = _mpp_from_uns(src.uns, path)
    if mpp is None and image is not None:
        mpp = tiff_mpp(Path(image))
    return canonicalise(adata, slide_id=slide_id, source="hest", file=str(path), mpp=mpp,
                        image_path=None if image is None else str(image))


def tiff_mpp(path: Path) -> float | None:
    """Micrometres per pixel from the resolution tags of a TIFF's first (full-resolution) page.

    ``None`` when the tags are absent, the unit is ``NONE`` or the value is outside
    :data:`TIFF_MPP_RANGE`.
    """
    import tifffile

    if not path.is_file():
        raise GnnstError(f"file not found: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            xres = tags.get("XResolution")
            unit = tags.get("ResolutionUnit")
            xres = None if xres is None else xres.value
            unit = 2 if unit is None else int(unit.value)  # the TIFF default unit is the inch
    except Exception as e:  # tifffile raises many types for corrupt or non-TIFF input
        raise GnnstError(f"{path}: cannot be read as a TIFF image ({type(e).__name__}: {e})") from None
    if xres is None or unit not in MICROMETRES_PER_UNIT:
        return None
    num, den = xres if isinstance(xres, tuple) else (xres, 1)
    if not num or not den:
        return None
    value = MICROMETRES_PER_UNIT[unit] * den / num  # µm per unit / pixels per unit
    return float(value) if TIFF_MPP_RANGE[0] <= value <= TIFF_MPP_RANGE[1] else None


def _raw_counts(src: "AnnData", path: Path):
    """The integer counts ``[N, G]`` and their ``var``: ``X``, else ``layers['counts']``, else ``.raw``."""
    candidates = [(src.X, src.var)]
    if keys.COUNTS in src.layers:
        candidates.append((src.layers[keys.COUNTS], src.var))
    if src.raw is not None:
        candidates.append((src.raw.X, src.raw.var))
    for X, var in candidates:
        if X is not None and _is_integer(X):
            return X, var
    X = src.X
    if X is None:
        raise GnnstError(f"{path}: has no X matrix and no integer layers['{keys.COUNTS}'] or .raw")
    value = _first_non_integer(X)
    raise GnnstError(
        f"{path}: X is not raw counts (value {value!r} is not an integer) and neither "
        f"layers['{keys.COUNTS}'] nor .raw holds integer counts; use the 'h5ad' reader with "
        f"'counts_layer' for such files"
    )


def _values(X) -> np.ndarray:
    import scipy.sparse as sp

    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def _is_integer(X) -> bool:
    """Whether every finite value is a whole number (NaN is left for :func:`canonicalise` to report)."""
    v = _values(X)
    if v.dtype.kind in "iub":
        return True
    v = v[np.isfinite(v)]
    return bool(np.all(v == np.round(v)))


def _first_non_integer(X) -> float:
    v = _values(X)
    v = v[np.isfinite(v)]
    return float(v[v != np.round(v)][0])


def _mpp_from_metadata(path: Path) -> float | None:
    import json

    if not path.is_file():
        raise GnnstError(f"file not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GnnstError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(meta, dict):
        raise GnnstError(f"{path}: expected a JSON object of sample metadata, got {type(meta).__name__}")
    for key in METADATA_MPP_KEYS:
        value = _positive(meta.get(key), where=f"{path}: '{key}'")
        if value is not None:
            return value
    return None


def _mpp_from_uns(uns, path: Path) -> float | None:
    for key in UNS_MPP_KEYS:
        value = _positive(uns.get(key), where=f"{path}: uns['{key}']")
        if value is not None:
            return value
    return None


def _positive(value, *, where: str) -> float | None:
    """``value`` as a positive float; ``None`` for missing/null/NaN; an error naming ``where`` otherwise."""
    if value is None:
        return None
    try:
        v = float(np.asarray(value).item())
    except (TypeError, ValueError):
        raise GnnstError(f"{where} must be a pixel size in micrometres, got {value!r}") from None
    if np.isnan(v):
        return None
    if not (np.isfinite(v) and v > 0):
        raise GnnstError(f"{where} must be a positive pixel size in micrometres, got {value!r}")
    return v
