"""Regular spot grids (square or hexagonal) laid over a slide's tissue, for H&E-only prediction.

The grid is anchored to the image origin, not to the tissue, so the same slide and pitch always give
the same points. Grid indices ``(col, row)`` name the spots (``"<col>x<row>"``, as legacy ST arrays).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from gnnst.data.tissue import TissueMask

GRID_KINDS = ("hex", "square")


def grid_points(
    bbox: tuple[float, float, float, float], *, pitch_px: float, kind: str = "hex"
) -> tuple[np.ndarray, np.ndarray]:
    """Grid points inside ``bbox`` = ``(x0, y0, x1, y1)`` (full-resolution pixels).

    Args:
        bbox: region to cover, in pixels.
        pitch_px: centre-to-centre distance of neighbouring points, in pixels.
        kind: ``"square"`` (points at ``(pitch/2 + i*pitch, pitch/2 + j*pitch)``) or ``"hex"`` (rows
            ``pitch * sqrt(3)/2`` apart, odd rows shifted by ``pitch/2``: six neighbours at ``pitch``).

    Returns:
        ``(xy [N, 2] float64, colrow [N, 2] int64)``, ordered row by row.
    """
    if kind not in GRID_KINDS:
        raise GnnstError(f"--grid must be one of {', '.join(GRID_KINDS)}, got '{kind}'")
    if not np.isfinite(pitch_px) or pitch_px <= 0:
        raise GnnstError(f"grid pitch must be > 0 pixels, got {pitch_px}")
    x0, y0, x1, y1 = bbox
    dy = pitch_px * (np.sqrt(3.0) / 2.0 if kind == "hex" else 1.0)  # row spacing
    r0, r1 = max(int(np.floor((y0 - pitch_px / 2) / dy)), 0), int(np.ceil((y1 - pitch_px / 2) / dy))
    rows = np.arange(r0, max(r1, r0) + 1)
    c0, c1 = max(int(np.floor((x0 - pitch_px) / pitch_px)), 0), int(np.ceil(x1 / pitch_px))
    cols = np.arange(c0, max(c1, c0) + 1)
    cc, rr = np.meshgrid(cols, rows)  # [R, C]
    shift = (rr % 2) * 0.5 if kind == "hex" else 0.0
    x = pitch_px / 2 + (cc + shift) * pitch_px
    y = pitch_px / 2 + rr * dy
    xy = np.stack([x.ravel(), y.ravel()], 1)
    colrow = np.stack([cc.ravel(), rr.ravel()], 1).astype(np.int64)
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    return xy[inside], colrow[inside]


def tissue_grid(
    tissue: "TissueMask", *, width: int, height: int, pitch_px: float, kind: str = "hex"
) -> tuple[np.ndarray, list[str]]:
    """Grid points over ``tissue`` only: ``(pixel xy [N, 2], barcodes "<col>x<row>")``.

    A point is kept when its centre lies on the tissue mask and inside the ``width`` x ``height`` image.
    """
    if not tissue.mask.any():
        raise GnnstError("no tissue detected on the slide (the image looks blank); nothing to predict")
    x0, y0, x1, y1 = tissue.bbox()
    xy, colrow = grid_points((max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)),
                             pitch_px=pitch_px, kind=kind)
    keep = tissue.contains(xy) if len(xy) else np.zeros(0, dtype=bool)
    xy, colrow = xy[keep], colrow[keep]
    if len(xy) == 0:
        raise GnnstError(f"no grid point at a pitch of {pitch_px:.1f} px falls on the detected tissue; "
                         "use a smaller --grid-um")
    return xy, [f"{c}x{r}" for c, r in colrow]


def cell_offsets(pitch_px: float, *, kind: str = "hex", supersample: int = 1) -> np.ndarray:
    """``[S*S, 2]`` offsets (pixels) of ``S x S`` sub-positions spread evenly over a grid spot's cell.

    ``S = 1`` gives the centre only. For ``S = 2``: ``(±pitch/4, ±dy/4)`` with ``dy`` the row spacing
    (``pitch`` square, ``pitch * sqrt(3)/2`` hex), all inside the cell. Averaging the predictions at
    these positions makes a grid spot's value the mean over its cell rather than a point sample.
    """
    if kind not in GRID_KINDS:
        raise GnnstError(f"--grid must be one of {', '.join(GRID_KINDS)}, got '{kind}'")
    if int(supersample) != supersample or supersample < 1:
        raise GnnstError(f"--supersample must be an integer >= 1, got {supersample}")
    s = int(supersample)
    dy = pitch_px * (np.sqrt(3.0) / 2.0 if kind == "hex" else 1.0)
    f = (np.arange(s) + 0.5) / s - 0.5  # [S] in (-0.5, 0.5)
    fx, fy = np.meshgrid(f, f)
    return np.stack([fx.ravel() * pitch_px, fy.ravel() * dy], 1)
