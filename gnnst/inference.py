"""Prediction for unseen slides: a :class:`~gnnst.predictor.TrainedModel` plus an H&E image and spot
coordinates, no expression.

``predict_spots`` is the one path from spots and an image to a
:class:`~gnnst.predictor.Prediction` (embeddings, the slide's graph as in training,
:meth:`TrainedModel.predict` with the members' spread and out-of-distribution scores);
``predict_slide`` (``gnnst predict --spots``) packages it with
:func:`gnnst.predictions.prediction_anndata`, :func:`gnnst.tl.predict` writes it into a user's AnnData.
``predict_grid`` lays a regular grid of spots over the tissue of an H&E-only whole slide and predicts
there (``write_grid_maps`` draws the result, flagged spots in grey).

The model carries everything needed (encoder name and identity, patch size in µm, gene panel,
graph parameters, normalisation, target scaling, the feature normalisation it was trained with); a
mismatch is an error, not a silent wrong answer. A new slide's patches are stain-normalised to the
model's reference when it was trained so (the slide's stain estimated on its own pixels), and its
embeddings standardised by its own statistics when it was trained so (in :meth:`TrainedModel.predict`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError
from gnnst.data.encoders import CPU_BATCH_SIZE
from gnnst.data.slides import spots_anndata

if TYPE_CHECKING:
    from anndata import AnnData
    from torch_geometric.data import Data

    from gnnst.data.images import SlideImage
    from gnnst.predictor import Prediction, TrainedModel

log = logging.getLogger("gnnst")
OOD_GREY = "#9e9e9e"  # colour of out-of-distribution spots in maps


def read_spot_table(path: str | Path, *, slide_id: str) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Spot table -> (pixel ``[N, 2]``, barcodes, array coordinates ``[N, 2]`` or None).

    Accepts CSV or TSV with ``pixel_x, pixel_y`` (and optionally legacy-ST array ``x, y`` and
    ``selected``), or just ``x, y`` in pixels; an optional ``barcode`` column names the spots.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise GnnstError(f"spot table not found: {path}")
    try:
        t = pd.read_csv(path, sep=None, engine="python")
    except Exception as e:
        raise GnnstError(f"{path}: cannot read the spot table ({type(e).__name__}: {e})") from None
    if "selected" in t.columns:
        t = t[t["selected"] == 1]
        if t.empty:
            raise GnnstError(f"{path}: no spots under tissue in the spot table of slide '{slide_id}': no row has 1 "
                             f"in column 'selected'")
    arr = None
    if {"pixel_x", "pixel_y"} <= set(t.columns):
        xy = t[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
        if {"x", "y"} <= set(t.columns):
            arr = t[["x", "y"]].to_numpy(dtype=np.float64)
    elif {"x", "y"} <= set(t.columns):
        xy = t[["x", "y"]].to_numpy(dtype=np.float64)
    else:
        raise GnnstError(f"{path}: spot table needs columns 'pixel_x, pixel_y' or 'x, y' (has {list(t.columns)})")
    if "barcode" in t.columns:
        bc = t["barcode"].astype(str).tolist()
    elif arr is not None:
        bc = [f"{int(a)}x{int(b)}" for a, b in arr]
    else:
        bc = [f"spot{i}" for i in range(len(t))]
    if len(xy) == 0:
        raise GnnstError(f"{path}: no spots in the spot table of slide '{slide_id}'")
    if not np.isfinite(xy).all():
        raise GnnstError(f"{path}: spot '{bc[int(np.where(~np.isfinite(xy).all(1))[0][0])]}' has a NaN coordinate")
    if len(set(bc)) != len(bc):
        raise GnnstError(f"{path}: duplicate spot barcode in the spot table")
    return xy, bc, arr


def predict_slide(
    model: "TrainedModel",
    image: str | Path,
    pixel_xy: np.ndarray,
    barcodes: list[str],
    *,
    slide_id: str,
    mpp: float,
    cache_dir: str | None = None,
    batch_size: int = CPU_BATCH_SIZE,
    device: str = "auto",
    progress: bool = True,
    opened: "SlideImage | None" = None,
    reliable_pcc: float | None = None,
) -> "AnnData":
    """Predicted expression of one unseen slide as AnnData (:func:`gnnst.predictions.prediction_anndata`,
    predictions in ``X`` and ``layers['gnnst_pred']``, the graph in ``obsp``, the members' spread in
    ``layers['gnnst_sd']``, OOD scores and flags in ``obs``, per-gene reliability in ``var`` at
    ``reliable_pcc``).

    ``batch_size`` patches go through the encoder at a time. ``opened`` is ``image`` already opened
    (for JPEG/PNG: decoded), e.g. to read its resolution first; it is closed once the embeddings are
    there. Without it the image is opened only when the embeddings are not in the cache.
    """
    from gnnst.predictions import prediction_anndata

    a = spots_anndata(pixel_xy, barcodes, slide_id=slide_id, mpp=mpp, image=image)
    pred, g, emb = predict_spots(model, a, cache_dir=cache_dir, batch_size=batch_size, device=device,
                                 progress=progress, opened=opened)
    return prediction_anndata(model, pred, slide_id=slide_id, barcodes=list(a.obs_names), pixel=a.obsm[keys.SPATIAL],
                              mpp=mpp, graph=g, embeddings=emb, image_path=image, reliable_pcc=reliable_pcc)


def predict_spots(
    model: "TrainedModel",
    spots: "AnnData",
    *,
    cache_dir: str | None = None,
    batch_size: int = CPU_BATCH_SIZE,
    device: str = "auto",
    progress: bool = True,
    opened: "SlideImage | None" = None,
    image_id: str | None = None,
) -> tuple["Prediction", "Data", np.ndarray]:
    """The one prediction path for spots: ``(prediction, graph, embeddings [N, D])``.

    Args:
        spots: canonical AnnData of the spots (:func:`spots_anndata`: ``obsm['spatial']`` full-resolution
            pixels, ``obs['slide_id']``, ``uns['gnnst']`` with ``mpp``, ``image_path`` and, for a
            downscaled image, ``image_scalef``).
        opened: the image already opened (closed here once the embeddings are there); else it is opened
            from ``image_path`` only when the embeddings are not cached.
        image_id: identity of the image for the embedding cache (default: path, size and mtime).

    The prediction has the members (their sd: :attr:`Prediction.sd`) and, when the model has an OOD
    reference, each spot's out-of-distribution score and flag.
    """
    from gnnst.data.embeddings import embed_spots
    from gnnst.data.encoders import resolve_device
    from gnnst.data.manifest import cache_root
    from gnnst.graph.dataset import slide_to_data

    dev = resolve_device(device)
    enc = model.create_encoder(dev)
    emb = embed_spots(spots, enc, size_um=model.patch_size_um, batch_size=batch_size, device=dev,
                      cache_dir=cache_root(cache_dir) / "embeddings", progress=progress, image=opened,
                      image_id=image_id, transform=_stain_transform(model, spots, image=opened))
    if opened is not None:
        opened.close()  # also when the cache held the embeddings
    g = slide_to_data(spots, emb, None, k=model.graph.k, radius_um=model.graph.radius_um)
    return model.predict(g, device=dev), g, emb


def _stain_transform(model: "TrainedModel", a: "AnnData", *, image=None):
    """The map of the slide's patches (its own pixels) to the model's stain reference, or ``None`` when the
    model was trained without stain normalisation (:meth:`gnnst.graph.features.FeatureState.stain_transform`)."""
    tf = model.feature_norm.stain_transform(a, size_um=model.patch_size_um, image=image)
    if tf is not None:
        log.info("slide '%s': stain normalisation (%s) to the model's reference, estimated on %d tissue pixels of "
                 "its own patches", a.obs[keys.SLIDE_ID].iloc[0], model.feature_norm.stain_norm, tf.source.n_pixels)
    return tf


def predict_grid(
    model: "TrainedModel",
    image: str | Path,
    *,
    grid_um: float,
    kind: str = "hex",
    supersample: int = 2,
    slide_id: str,
    mpp: float | None = None,
    cache_dir: str | None = None,
    batch_size: int = CPU_BATCH_SIZE,
    device: str = "auto",
    progress: bool = True,
    reliable_pcc: float | None = None,
) -> "AnnData":
    """Predicted expression over an H&E-only slide, at a regular grid of spots laid over its tissue.

    Tissue is detected on a thumbnail (:mod:`gnnst.data.tissue`); grid points (:mod:`gnnst.data.grid`)
    on glass are dropped before anything is encoded. Patches are read at the pyramid level closest to
    the model's patch size and streamed in batches, so memory does not grow with the slide.

    With ``supersample = S > 1`` the grid is predicted ``S * S`` times, shifted to sub-positions spread
    over each cell (:func:`gnnst.data.grid.cell_offsets`); every copy is a grid of the same pitch with
    its graph built as in training, and a spot's value is the mean over its cell (``S * S`` patches
    per spot). ``S = 1`` is a point sample at the spot centre, ~S² times faster. The members' spread
    (``layers['gnnst_sd']``) is that of their cell means, a spot's OOD score the mean over its cell.

    Args:
        model: the trained model (:meth:`TrainedModel.load`).
        image: the slide (openslide formats or JPEG/PNG).
        grid_um: centre-to-centre distance of neighbouring grid spots, µm.
        kind: ``"hex"`` or ``"square"``.
        supersample: sub-positions per cell side (see above).
        slide_id: key of the slide in ``obs['slide_id']`` and ``uns['spatial']``.
        mpp: micrometres per pixel; ``None`` = from the slide's metadata (an error when absent).

    Sets the fields of :func:`predict_slide` (``obsm['spatial']``: cell centres; the image embedding
    is the mean over the sub-positions) plus ``uns['spatial'][slide_id]`` (thumbnail and scanpy's
    Visium scale factors; ``spot_diameter_fullres`` = the grid pitch, so the spots tile the map) and
    ``uns['gnnst']['grid']`` (kind, pitch in µm and pixels, supersample, tissue threshold and fraction).
    """
    from gnnst.data.embeddings import embed_spots
    from gnnst.data.encoders import resolve_device
    from gnnst.data.grid import cell_offsets, tissue_grid
    from gnnst.data.images import open_image
    from gnnst.data.manifest import cache_root
    from gnnst.data.tissue import detect_tissue
    from gnnst.graph.dataset import slide_to_data
    from gnnst.graph.edges import check_spot_counts
    from gnnst.predictions import add_image, prediction_anndata

    if not np.isfinite(grid_um) or grid_um <= 0:
        raise GnnstError(f"--grid-um must be > 0, got {grid_um}")
    with open_image(image) as im:
        if mpp is None:
            mpp = im.mpp
        if mpp is None:
            raise GnnstError(f"{image}: no micrometres per pixel in the slide's metadata (openslide mpp-x/mpp-y "
                             "or TIFF resolution tags); give --mpp")
        pitch_px = grid_um / mpp
        offsets = cell_offsets(pitch_px, kind=kind, supersample=supersample)  # [K, 2]
        tissue = detect_tissue(im, mpp=mpp)
        xy, barcodes = tissue_grid(tissue, width=im.width, height=im.height, pitch_px=pitch_px, kind=kind)
        size = (im.width, im.height)
    n, n_sub = len(xy), len(offsets)
    log.info("slide '%s': %d x %d px at %.4f µm/px, tissue %.1f%%, %d %s grid spots at %.0f µm, %d patch(es) each",
             slide_id, size[0], size[1], mpp, 100 * tissue.fraction, n, kind, grid_um, n_sub)
    check_spot_counts({f"the tissue grid of '{slide_id}' (--grid-um {grid_um:g})": n},
                      [(f"the checkpoint's graph.k={model.graph.k}", model.graph.k)],
                      hint="use a smaller --grid-um, or a checkpoint trained with a smaller graph.k")
    dev = resolve_device(device)
    enc = model.create_encoder(dev)
    sub_xy = np.concatenate([np.clip(xy + off, 0, (size[0] - 1, size[1] - 1)) for off in offsets])  # [K*N, 2]
    sub = spots_anndata(sub_xy, [f"{b}/{k}" for k in range(n_sub) for b in barcodes], slide_id=slide_id,
                        mpp=mpp, image=image)
    emb = embed_spots(sub, enc, size_um=model.patch_size_um, batch_size=batch_size, device=dev,
                      cache_dir=cache_root(cache_dir) / "embeddings", progress=progress,
                      transform=_stain_transform(model, sub))  # [K*N, D]
    # each shifted copy is a whole grid: its graph is built as in training
    graphs = [slide_to_data(sub[k * n:(k + 1) * n], emb[k * n:(k + 1) * n], None, k=model.graph.k,
                            radius_um=model.graph.radius_um) for k in range(n_sub)]
    p = cell_mean(model, (model.predict(g, device=dev) for g in graphs))
    out = prediction_anndata(model, p, slide_id=slide_id, barcodes=barcodes, pixel=xy, mpp=mpp,
                             graph=graphs[0] if n_sub == 1 else model.slide_graph(xy, mpp),
                             embeddings=emb.reshape(n_sub, n, -1).mean(0), image_path=image,
                             reliable_pcc=reliable_pcc)
    add_image(out, image, library_id=slide_id, mpp=mpp, spot_diameter_um=grid_um)
    out.uns[keys.UNS_GNNST]["grid"] = {"kind": kind, "pitch_um": float(grid_um), "pitch_px": float(pitch_px),
                                       "supersample": int(supersample), "patches_per_spot": int(n_sub),
                                       "tissue_threshold": float(tissue.threshold),
                                       "tissue_fraction": float(tissue.fraction)}
    return out


def cell_mean(model: "TrainedModel", preds: Iterable["Prediction"]) -> "Prediction":
    """The mean of the predictions of one grid's shifted copies (same spots, consumed one at a time so only
    the running sums are held): expression and each member's prediction averaged over the copies, the OOD
    score averaged and flagged with the model's threshold."""
    from gnnst.predictor import Prediction

    n, total = 0, None
    for q in preds:
        parts = (q.expression, q.members, q.ood_score)
        total = [None if a is None else np.array(a, np.float32) for a in parts] if total is None else \
            [None if t is None else t + a for t, a in zip(total, parts)]
        n += 1
    expr, members, score = (None if t is None else (t / n).astype(np.float32) for t in total)
    return Prediction(expression=expr, members=members, ood_score=score,
                      ood=None if score is None else model.ood_reference.flag(score))


def write_grid_maps(adata: "AnnData", genes: list[str], out_prefix: str | Path, *, dpi: int = 150) -> list[Path]:
    """PNG maps of predicted ``genes`` over the slide's thumbnail: ``<out_prefix>_<gene>.png``; spots flagged
    out of distribution (``obs['gnnst_ood']``) are drawn in grey, without their value.

    Needs ``uns['spatial'][<slide_id>]`` (see :func:`predict_grid`). Returns the files written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gnnst.io import atomic_path

    slide_id = str(adata.obs[keys.SLIDE_ID].iloc[0])
    lib = adata.uns[keys.SPATIAL][slide_id]
    img = lib[keys.IMAGES][keys.HIRES]  # [h, w, 3]
    scalef = float(lib[keys.SCALEFACTORS][keys.HIRES_SCALEF])
    diameter = float(lib[keys.SCALEFACTORS][keys.SPOT_DIAMETER]) * scalef  # thumbnail pixels
    unknown = [g for g in genes if g not in adata.var_names]
    if unknown:
        raise GnnstError(f"--plot-genes: gene '{unknown[0]}' is not in the model's panel "
                         f"({adata.n_vars} genes, e.g. {', '.join(map(str, adata.var_names[:5]))})")
    hex_grid = adata.uns[keys.UNS_GNNST].get("grid", {}).get("kind", "hex") == "hex"
    h, w = img.shape[:2]
    xy = np.asarray(adata.obsm[keys.SPATIAL]) * scalef
    width_in = 7.0
    pts_per_px = width_in * 72.0 / w
    size = (diameter * pts_per_px * (1.16 if hex_grid else 1.0)) ** 2  # marker area, points^2
    ood = adata.obs[keys.OOD].to_numpy(dtype=bool) if keys.OOD in adata.obs else np.zeros(adata.n_obs, bool)
    written = []
    for gene in genes:
        v = np.asarray(adata[:, gene].layers[keys.PRED]).ravel()
        fig = Figure(figsize=(width_in + 1.3, width_in * h / w + 0.5))
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.0, 0.0, width_in / (width_in + 1.3), width_in * h / w / (width_in * h / w + 0.5)))
        ax.imshow(img)
        marker = "h" if hex_grid else "s"
        sc = ax.scatter(xy[~ood, 0], xy[~ood, 1], c=v[~ood], s=size, marker=marker, cmap="viridis",
                        vmin=float(v.min()), vmax=float(v.max()), linewidths=0, alpha=0.85)
        if ood.any():
            ax.scatter(xy[ood, 0], xy[ood, 1], c=OOD_GREY, s=size, marker=marker, linewidths=0, alpha=0.85)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        ax.set_title(f"{slide_id}: {gene}" + (f" (grey: {int(ood.sum())} spots out of distribution)"
                                              if ood.any() else ""), fontsize=10)
        fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.02, label="predicted log1p(CP10k)")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in gene)
        path = Path(f"{out_prefix}_{safe}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
        written.append(path)
    return written
