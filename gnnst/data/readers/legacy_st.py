"""Legacy Spatial Transcriptomics (the her2st / ST-Net layout) to canonical AnnData."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")  # required in the spot (selection) file
ST_PITCH_UM = 200.0  # centre-to-centre distance of adjacent legacy ST spots
# a spot further than this fraction of the array step from where its array position puts it is flagged
# (half a step: it is then nearer a neighbouring array position than its own)
PITCH_OUTLIER_STEPS = 0.5

log = logging.getLogger("gnnst")


def read_legacy_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str,
    mpp: float | None = None,
    pitch_um: float = ST_PITCH_UM,
    unmatched: str = "error",
) -> "AnnData":
    """Read one legacy ST section.

    Args:
        counts: tab-separated spots x genes raw counts (``.tsv`` or ``.tsv.gz``); row ids ``"<x>x<y>"``;
            the header names the genes (with or without a leading field for the row ids).
        spots: spot table with columns ``x y pixel_x pixel_y`` and optionally ``selected``; rows with
            ``selected == 0`` are outside tissue and dropped. ``pixel_x`` is the image column.
        image: the full-resolution H&E image the pixel coordinates refer to.
        slide_id: written to ``obs['slide_id']``.
        mpp: micrometres per pixel; when ``None`` it is derived from the spot pitch (see
            :func:`mpp_from_pitch`; spots whose pixel position does not fit their array position are
            named in a warning and left out of that fit).
        pitch_um: array pitch used to derive ``mpp``.
        unmatched: what to do with counts rows whose spot id is not in the spot file: ``"error"``
            (the default) or ``"drop"`` them, logging how many (some public sets, e.g. STUtility's,
            ship counts for every array spot and a spot table of the aligned ones only).

    Selected spots with no counts row are dropped, and counted in the log. Duplicate gene symbols are
    kept apart and made unique (see :mod:`gnnst.data.validate`). Returns the canonical AnnData of
    :mod:`gnnst.data.validate`.
    """
    import anndata as ad
    import pandas as pd

    from gnnst.data.readers import check_choice
    from gnnst.data.validate import canonicalise, duplicate_names_quiet

    check_choice("unmatched", unmatched)
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
        if table.empty:
            raise GnnstError(f"{spots}: no spots under tissue in slide '{slide_id}': no row has 1 in column "
                             f"'selected'")

    cnt = _read_counts(counts)
    if cnt.index.duplicated().any():
        raise GnnstError(f"{counts}: duplicate spot barcode '{cnt.index[cnt.index.duplicated()][0]}'")
    unjoined = [i for i in cnt.index if i not in all_ids]
    if unjoined and unmatched == "error":
        raise GnnstError(
            f"{counts}: spot id '{unjoined[0]}' does not join the spot file {spots} "
            f"({len(unjoined)} of {len(cnt)} counts rows unmatched; reader_options: {{unmatched: drop}} drops them)"
        )
    if unjoined:
        log.info("slide %s: dropped %d of %d counts rows of %s whose spot id is not in %s (unmatched: drop), "
                 "e.g. '%s'", slide_id, len(unjoined), len(cnt), counts.name, spots.name, unjoined[0])
    keep = [i for i in table.index if i in cnt.index]
    no_counts = len(table) - len(keep)
    if not keep:
        raise GnnstError(f"{counts}: none of the {len(table)} spots under tissue (selected == 1 in {spots}) has a "
                         f"counts row, so slide '{slide_id}' has no spots")
    if no_counts:
        log.info("slide %s: %d of %d selected spots of %s have no counts row in %s and are dropped",
                 slide_id, no_counts, len(table), spots.name, counts.name)
    try:
        values = cnt.loc[keep].to_numpy(dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise GnnstError(f"{counts}: counts are not numeric ({e})") from None
    with duplicate_names_quiet():  # duplicate gene names are made unique, with a warning, by canonicalise
        adata = ad.AnnData(X=values, obs=pd.DataFrame(index=pd.Index(keep, name="barcode")),
                           var=pd.DataFrame(index=cnt.columns))
    sel = table.loc[keep]
    adata.obsm["spatial"] = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    adata.obs["array_x"] = sel["x"].to_numpy()
    adata.obs["array_y"] = sel["y"].to_numpy()
    if mpp is None and len(sel) >= 3:
        mpp = mpp_from_pitch(sel["x"].to_numpy(), sel["y"].to_numpy(), adata.obsm["spatial"], pitch_um,
                             barcodes=keep, where=f"{spots}: slide '{slide_id}'")
    return canonicalise(adata, slide_id=slide_id, source="legacy_st", file=str(counts), mpp=mpp,
                        image_path=None if image is None else str(image))


def mpp_from_pitch(
    ax: np.ndarray, ay: np.ndarray, pixel: np.ndarray, pitch_um: float, *,
    barcodes: Sequence[str] | None = None, where: str = "spot table",
    remedy: str = "give 'scale: {mpp: ...}' in the manifest",
) -> float:
    """Micrometres per pixel from array coordinates ``ax, ay`` ``[N]`` and pixels ``[N, 2]``.

    Fits ``pixel ~ A @ (ax, ay, 1)`` by least squares; the pixel length of one array step is the mean
    norm of the two step vectors. A spot whose pixel position lies more than
    :data:`PITCH_OUTLIER_STEPS` array steps from the fit does not fit its array position: it is left
    out and the fit repeated (until the set of such spots is stable), and a warning names those spots by barcode
    (``barcodes``, else row number), so one misplaced spot cannot shift the derived scale. ``where`` and
    ``remedy`` (what the user can do instead) go into the error when no scale can be derived.
    """
    A = np.c_[ax, ay, np.ones(len(ax))].astype(np.float64)  # [N, 3]
    pixel = np.asarray(pixel, dtype=np.float64)  # [N, 2]
    inlier = np.ones(len(A), dtype=bool)
    for _ in range(len(A)):  # each round drops or restores at least one spot; a few rounds in practice
        coef, *_ = np.linalg.lstsq(A[inlier], pixel[inlier], rcond=None)  # [3, 2]
        step = (np.linalg.norm(coef[0]) + np.linalg.norm(coef[1])) / 2.0  # px per array step
        if not np.isfinite(step) or step <= 0:
            raise GnnstError(f"{where}: cannot derive micrometres per pixel from the spot pitch: {remedy}")
        resid = np.linalg.norm(A @ coef - pixel, axis=1)  # [N] px
        fits = resid <= PITCH_OUTLIER_STEPS * step
        if np.array_equal(fits, inlier):
            break
        if fits.sum() < max(3, len(A) // 2):
            raise GnnstError(f"{where}: the spot pixel positions do not follow their array positions "
                             f"({int((~fits).sum())} of {len(A)} spots off the fitted grid); cannot derive "
                             f"micrometres per pixel: {remedy}")
        inlier = fits
    if not inlier.all():
        bad = np.flatnonzero(~inlier)
        names = [str(barcodes[i]) if barcodes is not None else f"row {i}" for i in bad]
        shown = ", ".join(f"{n} ({resid[i] / step:.2f} steps off)" for n, i in zip(names[:10], bad[:10]))
        log.warning("%s: %d spot(s) whose pixel position does not fit their array position, left out of the "
                    "pitch fit (%.4g px per %g µm step): %s%s", where, len(bad), step, pitch_um, shown,
                    ", ..." if len(bad) > 10 else "")
    return float(pitch_um / step)


def _read_counts(path: Path) -> "pd.DataFrame":
    """The counts table, spots x genes, indexed by spot id, with the gene names exactly as in the header
    (duplicates kept; pandas would rename the second ``ERBB2`` to ``ERBB2.1``).

    A plain numeric table (the common case) is parsed by :func:`numpy.loadtxt` into one float64 block:
    several times faster than pandas' one-column-per-gene parse of a 15,000-gene table. Anything that
    does not parse that way (NA markers, ragged rows, text, other compressions) is read by pandas, whose
    result and errors are the reference.
    """
    import pandas as pd

    fast = _read_counts_numeric(path)
    if fast is not None:
        names, ids, values = fast
        return pd.DataFrame(values, index=pd.Index(ids, dtype=object), columns=pd.Index(names, dtype=object))
    header = _read_table(path, index_col=None, header=None, nrows=1, dtype=str, keep_default_na=False)
    body = _read_table(path, index_col=0, header=None, skiprows=1, low_memory=False)
    names = list(header.iloc[0]) if len(header) else []
    if len(names) == body.shape[1] + 1:
        names = names[1:]  # the header's first field labels the row ids
    if len(names) != body.shape[1]:
        raise GnnstError(f"{path}: the header names {len(names)} genes but the rows have {body.shape[1]} values")
    body.columns = pd.Index([str(n) for n in names], dtype=object)
    body.index = body.index.astype(str)
    return body


_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def _read_counts_numeric(path: Path) -> tuple[list[str], list[str], np.ndarray] | None:
    """``(gene names, spot ids, values [spots, genes] float64)`` of a table whose body is all numbers
    after the id column, or ``None`` when it is anything else (the caller then reads it with pandas)."""
    import csv
    import importlib

    if not path.is_file():
        raise GnnstError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".zip", ".zst", ".tar"):  # archives pandas opens: left to it
        return None
    try:
        raw = path.read_bytes()
        if suffix in _OPENERS:
            raw = importlib.import_module(_OPENERS[suffix]).decompress(raw)
        text = raw.decode("utf-8")
    except Exception as e:  # corrupt archive, bad encoding
        raise GnnstError(f"{path}: cannot be read as a tab-separated table ({type(e).__name__}: {e})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) < 2 or "\t" not in lines[1]:
        return None
    names = next(csv.reader(lines[:1], delimiter="\t"))
    body = lines[1:]
    width = body[0].count("\t")  # values per row after the id
    try:
        values = np.loadtxt(body, delimiter="\t", dtype=np.float64, usecols=range(1, width + 1), ndmin=2,
                            quotechar='"', comments=None)
    except ValueError:
        return None
    if any(line.count("\t") != width for line in body):  # loadtxt would not notice extra trailing fields
        return None
    if len(names) == width + 1:
        names = names[1:]  # the header's first field labels the row ids
    if len(names) != width:
        raise GnnstError(f"{path}: the header names {len(names)} genes but the rows have {width} values")
    ids = [line[: line.index("\t")].strip('"') for line in body]
    return [str(n) for n in names], ids, values


def _read_table(path: Path, index_col, **kw):
    import pandas as pd

    if not path.is_file():
        raise GnnstError(f"file not found: {path}")
    try:
        return pd.read_csv(path, sep="\t", index_col=index_col, **kw)
    except Exception as e:  # pandas/gzip/zlib raise many types for corrupt input
        raise GnnstError(f"{path}: cannot be read as a tab-separated table ({type(e).__name__}: {e})") from None
