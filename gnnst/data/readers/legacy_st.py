"""Legacy Spatial Transcriptomics (the her2st / ST-Net layout) to canonical AnnData."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")  # required in the spot (selection) file
ST_PITCH_UM = 200.0  # centre-to-centre distance of adjacent legacy ST spots


def read_legacy_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str,
    mpp: float | None = None,
    pitch_um: float = ST_PITCH_UM,
) -> "AnnData":
    """Read one legacy ST section.

    Args:
        counts: tab-separated spots x genes raw counts (``.tsv`` or ``.tsv.gz``); row ids ``"<x>x<y>"``.
        spots: spot table with columns ``x y pixel_x pixel_y`` and optionally ``selected``; rows with
            ``selected == 0`` are outside tissue and dropped. ``pixel_x`` is the image column.
        image: the full-resolution H&E image the pixel coordinates refer to.
        slide_id: written to ``obs['slide_id']``.
        mpp: micrometres per pixel; when ``None`` it is derived from the spot pitch (the least-squares
            pixel distance between adjacent array positions is ``pitch_um``).
        pitch_um: array pitch used to derive ``mpp``.

    Every counts row must join a spot of the spot file (else an error naming the spot id); selected
    spots with no counts row are dropped. Returns the canonical AnnData of
    :mod:`gnnst.data.validate`.
    """
    import anndata as ad
    import pandas as pd

    from gnnst.data.validate import canonicalise

    counts, spots = Path(counts), Path(spots)
    table = _read_table(spots, index_col=None)
    missing = [c for c in SPOT_COLUMNS if c not in table.columns]
    if missing:
        raise GnnstError(f"{spots}: spot file lacks column '{missing[0]}' (needs {', '.join(SPOT_COLUMNS)})")
    table.index = table["x"].astype(str) + "x" + table["y"].astype(str)
    if table.index.duplicated().any():
        raise GnnstError(f"{spots}: duplicate spot id '{table.index[table.index.duplicated()][0]}'")
    all_ids = set(table.index)
    if "selected" in table.columns:
        table = table[table["selected"] == 1]

    cnt = _read_table(counts, index_col=0)
    cnt.index = cnt.index.astype(str)
    if cnt.index.duplicated().any():
        raise GnnstError(f"{counts}: duplicate spot barcode '{cnt.index[cnt.index.duplicated()][0]}'")
    unjoined = [i for i in cnt.index if i not in all_ids]
    if unjoined:
        raise GnnstError(
            f"{counts}: spot id '{unjoined[0]}' does not join the spot file {spots} "
            f"({len(unjoined)} of {len(cnt)} counts rows unmatched)"
        )
    keep = [i for i in table.index if i in cnt.index]
    try:
        values = cnt.loc[keep].to_numpy(dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise GnnstError(f"{counts}: counts are not numeric ({e})") from None
    adata = ad.AnnData(X=values, obs=pd.DataFrame(index=pd.Index(keep, name="barcode")),
                       var=pd.DataFrame(index=cnt.columns.astype(str)))
    sel = table.loc[keep]
    adata.obsm["spatial"] = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    adata.obs["array_x"] = sel["x"].to_numpy()
    adata.obs["array_y"] = sel["y"].to_numpy()
    if mpp is None and len(sel) >= 3:
        mpp = mpp_from_pitch(sel["x"].to_numpy(), sel["y"].to_numpy(), adata.obsm["spatial"], pitch_um)
    return canonicalise(adata, slide_id=slide_id, source="legacy_st", file=str(counts), mpp=mpp,
                        image_path=None if image is None else str(image))


def mpp_from_pitch(ax: np.ndarray, ay: np.ndarray, pixel: np.ndarray, pitch_um: float) -> float:
    """Micrometres per pixel from array coordinates ``ax, ay`` ``[N]`` and pixels ``[N, 2]``.

    Fits ``pixel ~ A @ (ax, ay, 1)`` by least squares; the pixel length of one array step is the mean
    norm of the two step vectors.
    """
    A = np.c_[ax, ay, np.ones(len(ax))].astype(np.float64)  # [N, 3]
    coef, *_ = np.linalg.lstsq(A, pixel, rcond=None)  # [3, 2]
    step = (np.linalg.norm(coef[0]) + np.linalg.norm(coef[1])) / 2.0  # px per array step
    if not np.isfinite(step) or step <= 0:
        raise GnnstError("cannot derive micrometres per pixel from the spot pitch: give 'mpp' in the manifest")
    return float(pitch_um / step)


def _read_table(path: Path, index_col):
    import pandas as pd

    if not path.is_file():
        raise GnnstError(f"file not found: {path}")
    try:
        return pd.read_csv(path, sep="\t", index_col=index_col)
    except Exception as e:  # pandas/gzip/zlib raise many types for corrupt input
        raise GnnstError(f"{path}: cannot be read as a tab-separated table ({type(e).__name__}: {e})") from None
