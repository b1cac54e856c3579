"""Scanpy-style plots of gnnst predictions: ``gnnst.pl.prediction(adata, genes)``.

Works on both places predictions live: a prediction file (``gnnst predict``, a run's
``predictions/<slide>.h5ad``, ``gnnst export``) and a user's AnnData after :func:`gnnst.tl.predict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure



def prediction(
    adata: "AnnData",
    genes: str | Sequence[str],
    *,
    library_id: str | None = None,
    image: bool = True,
    grey_ood: bool = True,
    panel_size: float = 3.6,
    save: str | Path | None = None,
    dpi: int = 150,
) -> "Figure":
    """One row per gene: measured expression (when ``adata`` has it), predicted, the ensemble sd (when there
    is one); and one panel of the out-of-distribution score with flagged spots circled (when scored).

    Args:
        adata: predictions of one slide (see the module docstring); spots at ``obsm['spatial']``.
        genes: gene(s) of the model's panel.
        library_id: key of ``uns['spatial']`` holding the H&E drawn underneath (default: the slide's).
        image: draw the H&E when ``uns['spatial']`` has one.
        grey_ood: draw flagged spots (``obs['gnnst_ood']``) in grey in the prediction and sd panels.
        panel_size: inches per panel side.
        save: write the figure there as PNG (atomically).

    Returns the matplotlib ``Figure`` (drawn without pyplot; display it in a notebook or save it).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gnnst.tl import measured, predicted

    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise GnnstError("gnnst.pl.prediction: no gene given")
    if keys.SPATIAL not in adata.obsm:
        raise GnnstError(f"gnnst.pl.prediction: adata has no obsm['{keys.SPATIAL}']")
    rows = []
    for g in genes:
        pred, sd = predicted(adata, g)
        rows.append((g, measured(adata, g), pred, sd))
    has_meas = any(r[1] is not None for r in rows)
    has_sd = any(r[3] is not None for r in rows)
    score = adata.obs[keys.OOD_SCORE].to_numpy(dtype=float) if keys.OOD_SCORE in adata.obs else None
    flagged = adata.obs[keys.OOD].to_numpy(dtype=bool) if keys.OOD in adata.obs else np.zeros(adata.n_obs, bool)
    ncols = 1 + has_meas + has_sd + (score is not None)
    bg, scalef, diameter = _background(adata, library_id, image)
    xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64) * scalef
    pad = 1.5 * diameter
    lims = (xy[:, 0].min() - pad, xy[:, 0].max() + pad, xy[:, 1].max() + pad, xy[:, 1].min() - pad)  # the spots' box
    extent = (lims[1] - lims[0], lims[2] - lims[3])
    aspect = extent[1] / max(extent[0], 1e-9)
    fig = Figure(figsize=(panel_size * ncols * 1.25, panel_size * aspect * len(rows) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    size = (diameter * panel_size * 72.0 / max(extent[0], 1e-9)) ** 2  # marker area, points^2
    grey = flagged if grey_ood else np.zeros_like(flagged)
    for r, (g, meas, pred, sd) in enumerate(rows):
        c = 0
        if has_meas:
            _panel(axes[r, c], xy, meas, size, bg, lims, f"{g}: measured", "viridis",
                   None if meas is not None else "not measured")
            c += 1
        _panel(axes[r, c], xy, pred, size, bg, lims, f"{g}: predicted", "viridis", None, grey=grey)
        c += 1
        if has_sd:
            _panel(axes[r, c], xy, sd, size, bg, lims, f"{g}: ensemble sd", "magma",
                   None if sd is not None else "no sd", grey=grey)
            c += 1
        if score is not None:
            if r == 0:
                ax = axes[r, c]
                _panel(ax, xy, score, size, bg, lims, f"OOD score ({int(flagged.sum())} of {len(flagged)} flagged)",
                       "cividis", None)
                if flagged.any():
                    ax.scatter(xy[flagged, 0], xy[flagged, 1], s=size * 1.6, facecolors="none", edgecolors="red",
                               linewidths=0.8)
            else:
                axes[r, c].set_axis_off()
    fig.tight_layout()
    if save is not None:
        from gnnst.io import atomic_path

        with atomic_path(Path(save)) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    return fig


def _background(adata: "AnnData", library_id: str | None, image: bool) -> tuple[np.ndarray | None, float, float]:
    """``(H&E [h, w, 3] or None, its pixels per full-resolution pixel, spot diameter in its pixels)``."""
    from gnnst.predictions import _pitch_px

    spatial = adata.uns.get(keys.SPATIAL, {})
    lib = library_id
    if lib is None and keys.SLIDE_ID in adata.obs:
        lib = str(adata.obs[keys.SLIDE_ID].astype(str).iloc[0])
    if lib not in spatial and len(spatial) == 1:
        lib = next(iter(spatial))
    entry = spatial.get(lib, {}) if lib is not None else {}
    factors = entry.get(keys.SCALEFACTORS, {})
    xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)
    diameter_full = float(factors.get(keys.SPOT_DIAMETER) or 0.5 * _pitch_px(xy))
    if image and keys.HIRES in entry.get(keys.IMAGES, {}) and keys.HIRES_SCALEF in factors:
        scalef = float(factors[keys.HIRES_SCALEF])
        return np.asarray(entry[keys.IMAGES][keys.HIRES]), scalef, diameter_full * scalef
    return None, 1.0, diameter_full


def _panel(ax, xy: np.ndarray, values: np.ndarray | None, size: float, bg: np.ndarray | None, lims: tuple,
           title: str, cmap: str, empty: str | None, *, grey: np.ndarray | None = None) -> None:
    """One map: ``values`` ``[N]`` at ``xy`` over ``bg``, within ``lims`` (x0, x1, y_bottom, y_top)."""
    from gnnst.inference import OOD_GREY

    if bg is not None:
        ax.imshow(bg)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.set_axis_off()
    if values is None:
        ax.text(0.5, 0.5, empty or "", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    else:
        keep = np.ones(len(xy), bool) if grey is None else ~grey
        v = np.asarray(values, dtype=float)
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        sc = ax.scatter(xy[keep, 0], xy[keep, 1], c=v[keep], s=size, cmap=cmap, vmin=lo, vmax=hi, linewidths=0)
        if grey is not None and grey.any():
            ax.scatter(xy[grey, 0], xy[grey, 1], c=OOD_GREY, s=size, linewidths=0)
        ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    ax.set_xlim(lims[0], lims[1])
    ax.set_ylim(lims[2], lims[3])
