"""Figures of a train run (PNG, drawn on matplotlib's Agg canvas): what the metrics look like on tissue.

``plot_run(run)`` writes into ``run/figures``:

- ``maps_<slide>.png``: measured beside predicted expression over the H&E for the best, median and
  worst gene (by Pearson r on that held-out slide), one colour scale per panel (r is scale-free);
- ``pcc_per_gene.png``: the distribution of per-gene Pearson r, over all held-out slides and per slide;
- ``moran.png`` and ``moran.csv``: Moran's I (``sq.gr.spatial_autocorr``, mode ``'moran'``, on the
  gnnst graph) of the predicted against the measured expression of every gene.

It is called at the end of ``gnnst train`` (``eval.figures``) and by ``gnnst plot --run RUNDIR``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from matplotlib.figure import Figure

log = logging.getLogger("gnnst")

FIG_DPI = 110  # resolution of the PNGs
MAP_DPI = 90  # resolution of the maps (the H&E under them makes the PNGs large)
IMAGE_MAX_SIDE = 1200  # longer side of the H&E loaded for the maps (before cropping to the spots)


def agg_figure(**kw) -> "Figure":
    """A matplotlib Figure on the Agg canvas, without pyplot (no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def per_gene_pcc(adata: "AnnData", *, layer: str = keys.PRED) -> np.ndarray:
    """Pearson r of ``layers[layer]`` against ``X`` per gene ``[G]`` (NaN where either is constant)."""
    from gnnst.metrics import pearson_per_gene

    return pearson_per_gene(_dense(adata.X), _dense(adata.layers[layer]))


def pick_genes(adata: "AnnData", *, layer: str = keys.PRED) -> dict[str, tuple[str, float]]:
    """``{'best', 'median', 'worst'}`` -> (gene, r) by the per-gene Pearson r of one slide."""
    r = per_gene_pcc(adata, layer=layer)
    ok = np.where(np.isfinite(r))[0]
    if not len(ok):
        raise GnnstError(f"slide '{_slide(adata)}': no gene varies in both measurement and prediction")
    order = ok[np.argsort(-r[ok], kind="stable")]  # best first
    picks = {"best": order[0], "median": order[len(order) // 2], "worst": order[-1]}
    return {k: (str(adata.var_names[i]), float(r[i])) for k, i in picks.items()}


def plot_gene_maps(adata: "AnnData", *, genes: dict[str, tuple[str, float]] | None = None,
                   layer: str = keys.PRED) -> "Figure":
    """Measured (left) and predicted (right) expression over the H&E, one row per gene.

    Args:
        adata: one slide of a run (:func:`gnnst.eval.run.slide_from_run`); the H&E is drawn
            when ``uns['spatial'][<slide>]`` holds it.
        genes: row label -> (gene, r); default :func:`pick_genes` (best, median, worst).
        layer: the layer holding the predictions.
    """
    genes = pick_genes(adata, layer=layer) if genes is None else genes
    slide = _slide(adata)
    fig = agg_figure(figsize=(8.6, 3.7 * len(genes)))
    axes = fig.subplots(len(genes), 2, squeeze=False)
    for row, (label, (gene, r)) in enumerate(genes.items()):
        j = adata.var_names.get_loc(gene)
        for col, (name, values) in enumerate((("measured", _dense(adata.X)[:, j]),
                                              ("predicted", _dense(adata.layers[layer])[:, j]))):
            ax = axes[row, col]
            sc = _spot_map(ax, adata, values)
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
            title = f"{name} {gene}" + (f"  (r = {r:.2f})" if col == 1 else "")
            ax.set_title(title, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{label} gene", fontsize=11, fontweight="bold")
    fig.suptitle(f"held-out slide {slide}: measured vs predicted (log-normalised; colour scale per panel)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def _spot_map(ax, adata: "AnnData", values: np.ndarray):
    """Spots coloured by ``values`` over the slide's hires image, cropped to the spots."""
    from matplotlib.collections import EllipseCollection

    xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)  # [N, 2] full-resolution pixels
    lib = adata.uns.get(keys.SPATIAL, {}).get(_slide(adata))
    if lib is not None:
        scalef = float(lib[keys.SCALEFACTORS][keys.HIRES_SCALEF])
        diameter = float(lib[keys.SCALEFACTORS][keys.SPOT_DIAMETER]) * scalef
        img = lib[keys.IMAGES][keys.HIRES]
        ax.imshow(img, interpolation="antialiased")
    else:
        from scipy.spatial import cKDTree

        scalef, img = 1.0, None
        diameter = 0.5 * float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) if len(xy) > 1 else 1.0
    pts = xy * scalef
    lo, hi = np.nanpercentile(values, [1, 99]) if np.isfinite(values).any() else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    coll = EllipseCollection(widths=diameter, heights=diameter, angles=0, units="xy", offsets=pts,
                             offset_transform=ax.transData, cmap="viridis", linewidths=0)
    coll.set_array(np.asarray(values, dtype=np.float64))
    coll.set_clim(lo, hi)
    ax.add_collection(coll)
    pad = 1.5 * diameter
    x0, y0 = pts.min(0) - pad
    x1, y1 = pts.max(0) + pad
    if img is not None:
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, img.shape[1]), min(y1, img.shape[0])
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return coll


def plot_pcc_distribution(adatas: dict[str, "AnnData"], *, heg: dict[str, Sequence[str]] | None = None,
                          layer: str = keys.PRED) -> "Figure":
    """Histogram of per-gene Pearson r (all held-out slides) and its spread per slide.

    Args:
        adatas: slide id -> exported slide.
        heg: slide id -> the fold's top highly expressed genes (chosen on its training slides), marked
            separately when given.
    """
    r = {s: per_gene_pcc(a, layer=layer) for s, a in adatas.items()}
    fig = agg_figure(figsize=(11, 4.2))
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    all_r = np.concatenate([v[np.isfinite(v)] for v in r.values()])
    bins = np.linspace(min(-0.4, np.floor(all_r.min() * 10) / 10), max(0.8, np.ceil(all_r.max() * 10) / 10), 41)
    ax0.hist(all_r, bins=bins, color="#8da0cb", alpha=0.85, label=f"all panel genes (n = {len(all_r)})")
    if heg:
        h = np.concatenate([r[s][np.isin(adatas[s].var_names, list(heg[s]))] for s in adatas if s in heg])
        h = h[np.isfinite(h)]
        n_heg = len(next(iter(heg.values())))
        ax0.hist(h, bins=bins, color="#fc8d62", alpha=0.85, label=f"top-{n_heg} HEG (n = {len(h)})")
        ax0.axvline(np.median(h), color="#d95f02", ls="--", lw=1.2, label=f"HEG median {np.median(h):.2f}")
    ax0.axvline(np.median(all_r), color="#4c5b9c", ls="--", lw=1.2, label=f"all median {np.median(all_r):.2f}")
    ax0.axvline(0, color="k", lw=0.6)
    ax0.set_xlabel("Pearson r, predicted vs measured (per gene, per held-out slide)")
    ax0.set_ylabel("genes x slides")
    ax0.legend(fontsize=8, frameon=False)
    ax0.set_title("per-gene PCC, all held-out slides", fontsize=10)
    names = list(r)
    data = [r[s][np.isfinite(r[s])] for s in names]
    ax1.boxplot(data, tick_labels=names, showfliers=False, widths=0.6)
    for i, d in enumerate(data):
        jitter = np.random.default_rng(i).uniform(-0.18, 0.18, len(d))
        ax1.scatter(np.full(len(d), i + 1) + jitter, d, s=3, alpha=0.25, color="#4c5b9c", lw=0)
        ax1.scatter([i + 1], [np.mean(d)], marker="D", s=28, color="#d95f02", zorder=3,
                    label="mean" if i == 0 else None)
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_ylabel("Pearson r per gene")
    ax1.set_xlabel("held-out slide")
    ax1.legend(fontsize=8, frameon=False, loc="upper right")
    ax1.set_title("per slide (all panel genes)", fontsize=10)
    fig.tight_layout()
    return fig


def moran_table(adatas: dict[str, "AnnData"], *, layer: str = keys.PRED,
                connectivity_key: str = keys.CONNECTIVITIES) -> "pd.DataFrame":
    """Moran's I of measured (``X``) and predicted (``layers[layer]``) expression per slide and gene.

    Uses ``sq.gr.spatial_autocorr(mode='moran')`` on the slide's gnnst graph (no permutations).
    Columns: ``slide_id, gene, moran_measured, moran_predicted, pcc``.
    """
    import warnings

    import pandas as pd
    import squidpy as sq

    rows = []
    for s, a in adatas.items():
        genes = list(a.var_names)
        kw = dict(connectivity_key=connectivity_key, genes=genes, mode="moran", n_perms=None, copy=True,
                  use_raw=False)
        with warnings.catch_warnings():  # a gene constant on a slide has no Moran's I (NaN), not an error
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*were constant, will return nan")
            m = sq.gr.spatial_autocorr(a, **kw)["I"]
            p = sq.gr.spatial_autocorr(a, layer=layer, **kw)["I"]
        r = per_gene_pcc(a, layer=layer)
        rows.append(pd.DataFrame({keys.SLIDE_ID: s, "gene": genes, "moran_measured": m.reindex(genes).to_numpy(),
                                  "moran_predicted": p.reindex(genes).to_numpy(), "pcc": r}))
    return pd.concat(rows, ignore_index=True)


def plot_moran(table: "pd.DataFrame") -> "Figure":
    """Moran's I of the predicted against the measured expression, one point per gene and slide."""
    import matplotlib

    t = table.dropna(subset=["moran_measured", "moran_predicted"])
    fig = agg_figure(figsize=(5.8, 5.4))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    for i, (s, d) in enumerate(t.groupby(keys.SLIDE_ID, observed=True, sort=False)):
        ax.scatter(d["moran_measured"], d["moran_predicted"], s=7, alpha=0.55, color=cmap(i % 10), lw=0,
                   label=f"{s} (median I: {d['moran_measured'].median():.2f} / {d['moran_predicted'].median():.2f})")
    lo = float(min(t["moran_measured"].min(), t["moran_predicted"].min(), 0.0)) - 0.05
    hi = float(max(t["moran_measured"].max(), t["moran_predicted"].max())) + 0.05
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("Moran's I, measured expression")
    ax.set_ylabel("Moran's I, predicted expression")
    rho = t[["moran_measured", "moran_predicted"]].corr(method="spearman").iloc[0, 1] if len(t) > 2 else np.nan
    ax.set_title(f"spatial autocorrelation per gene on the gnnst graph\n(Spearman rho = {rho:.2f}, "
                 f"{len(t)} gene x slide pairs)", fontsize=10)
    ax.legend(fontsize=7, frameon=True, framealpha=0.9, loc="lower right", markerscale=2,
              title="slide (median I measured / predicted)", title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_run(run: str | Path, *, out: str | Path | None = None, slides: Sequence[str] | None = None,
             image: bool = True) -> list[Path]:
    """Write the figures of a ``gnnst train`` output folder (see the module docstring).

    Args:
        run: the train output folder (``predictions/``, ``folds/``, ``metrics.json``).
        out: folder for the PNGs (default ``run/figures``).
        slides: held-out slides to draw maps for (default: all).
        image: draw the H&E under the maps (skipped, with a warning, when the image is not found).

    Returns the paths written.
    """
    from gnnst.eval.run import read_run_metrics, select_run_slides, slide_from_run
    from gnnst.io import atomic_path

    run = Path(run)
    out = run / "figures" if out is None else Path(out)
    slides = select_run_slides(run, slides)
    metrics = read_run_metrics(run)
    adatas = {}
    for s in slides:
        try:
            adatas[s] = slide_from_run(run, s, image=image, max_side=IMAGE_MAX_SIDE)
        except GnnstError as e:
            if not image:
                raise
            log.warning("slide %s: maps without the H&E (%s)", s, e)
            adatas[s] = slide_from_run(run, s, image=False)
    heg = {}
    for f in metrics.get("folds", []):
        for s in f.get("test_slides", []):
            if "heg" in f.get("genes", {}):
                heg[s] = f["genes"]["heg"]
    written = []

    def save(fig, name: str, dpi: int = FIG_DPI) -> None:
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
        written.append(path)

    for s, a in adatas.items():
        save(plot_gene_maps(a), f"maps_{s}.png", dpi=MAP_DPI)
    save(plot_pcc_distribution(adatas, heg={s: heg[s] for s in adatas if s in heg} or None), "pcc_per_gene.png")
    table = moran_table(adatas)
    with atomic_path(out / "moran.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.5g")
    written.append(out / "moran.csv")
    save(plot_moran(table), "moran.png")
    return written


def _slide(adata: "AnnData") -> str:
    if keys.SLIDE_ID in adata.obs and adata.n_obs:
        return str(adata.obs[keys.SLIDE_ID].iloc[0])
    return str(adata.uns.get(keys.UNS_GNNST, {}).get(keys.SLIDE_ID, ""))


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
