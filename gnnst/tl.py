"""Scanpy-style tools: ``gnnst.tl.predict(adata, model)`` writes predicted expression, its spread and
out-of-distribution flags into a user's AnnData (for example one read with ``scanpy.read_visium``).

The prediction itself is :func:`gnnst.inference.predict_spots`, the path ``gnnst predict`` takes; only
where the results land differs. The user's ``var`` holds the measured genes, not the model's panel, so
the panel-wide outputs are ``obsm`` DataFrames whose columns are the panel's genes (as cell2location
writes its abundances); ``var`` gets the reliability columns for the genes it shares with the panel.
``gnnst.pl.prediction`` draws either layout. Write the result as a SpatialData store with
:func:`gnnst.export.spatialdata.write_spatialdata`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import __version__, keys
from gnnst.errors import GnnstError
from gnnst.data.encoders import CPU_BATCH_SIZE

if TYPE_CHECKING:
    from anndata import AnnData

    from gnnst.data.images import SlideImage
    from gnnst.predictor import TrainedModel

log = logging.getLogger("gnnst")

VISIUM_SPOT_UM = 55.0  # Visium spot diameter: with scanpy's spot_diameter_fullres it gives µm per pixel
PREDICTION = "prediction"  # uns['gnnst'][PREDICTION]: what gnnst.tl.predict wrote and with which model


def predict(
    adata: "AnnData",
    model: "TrainedModel | str | Path",
    *,
    image: "str | Path | np.ndarray | None" = None,
    copy: bool = False,
    library_id: str | None = None,
    mpp: float | None = None,
    spot_diameter_um: float = VISIUM_SPOT_UM,
    reliable_pcc: float | None = None,
    device: str = "auto",
    batch_size: int = CPU_BATCH_SIZE,
    cache_dir: str | None = None,
    progress: bool = True,
) -> "AnnData | None":
    """Predict the model's gene panel at the spots of ``adata`` from its H&E.

    Args:
        adata: one slide: spots at ``obsm['spatial']`` (full-resolution pixels, scanpy/squidpy's
            convention); any ``X`` (it is not read).
        model: a :class:`~gnnst.predictor.TrainedModel` or the path of its ``model.pt``.
        image: the slide's H&E: a file (full resolution, any format gnnst reads) or an ``[h, w, 3]`` array
            at full resolution. Default: ``uns['gnnst']['image_path']`` (AnnData read by gnnst), else
            ``uns['spatial'][library_id]['images']['hires']`` (then ``'lowres'``) with its
            ``tissue_hires_scalef`` (``tissue_lowres_scalef``); a downscaled image whose patches are under
            32 px is used with a warning, as the readers do.
        copy: return a modified copy instead of writing into ``adata``.
        library_id: key of ``uns['spatial']`` (default: the only one).
        mpp: micrometres per full-resolution pixel. Default: ``uns['gnnst']['mpp']``, else
            ``spot_diameter_um`` / ``uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']``,
            else the image file's metadata.
        spot_diameter_um: physical spot diameter for that default (Visium: 55 µm).
        reliable_pcc: the cross-validated PCC a gene needs to count as reliable (default: the model's
            ``reliability.reliable_pcc``).
        device, batch_size, cache_dir, progress: encoder device, patches per pass, embedding cache
            (``$GNNST_CACHE`` or ``~/.cache/gnnst`` by default), progress bar.

    Sets the following fields (``G`` = the model's panel, :attr:`TrainedModel.panel`):

    - ``adata.obsm['gnnst_pred']``: DataFrame ``[N, G]``, predicted normalised log expression (the units of
      the model's ``expression`` config, ``normalize_total`` + ``log1p``), columns = the panel's genes;
    - ``adata.obsm['gnnst_sd']``: DataFrame ``[N, G]``, sd of the ensemble members' predictions (not for a
      single-member model); ``pred +- z * scale * sd`` with ``z`` and ``scale`` of
      ``uns['gnnst']['prediction']['reliability']['sd']`` is the calibrated interval;
    - ``adata.obs['gnnst_ood_score']`` (float, 1 = a typical training spot seen from a new slide) and
      ``adata.obs['gnnst_ood']`` (bool, out of the training distribution);
    - ``adata.obsm['X_img_<encoder>']``: ``[N, D]`` patch embeddings;
    - ``adata.var['gnnst_cv_pcc']``, ``['gnnst_cv_pcc_sd']``, ``['gnnst_cv_pcc_new_patient']``,
      ``['gnnst_reliable']``: per-gene reliability for the genes of ``var`` in the panel (NaN / False for
      the others and when the model has no cross-validated PCC);
    - ``adata.obs['slide_id']``: ``library_id``, only when absent (squidpy's ``library_key``);
    - ``adata.uns['gnnst']``: ``mpp`` (when absent), ``version`` and ``prediction`` = the model (name,
      fold, trained on, members, protocol), the image and its scale, the expression units, ``reliability``
      (``genes``: threshold and counts; ``gene_table``: DataFrame of the four columns above for the whole
      panel; ``sd``; ``ood``) and the prediction-file layout keys used here.

    Returns ``None``, or the modified copy when ``copy``.
    """
    import pandas as pd

    from gnnst.inference import predict_spots, spots_anndata
    from gnnst.predictions import encoder_key, spot_reliability, write_ood
    from gnnst.predictor import TrainedModel
    from gnnst.reliability import describe_reliability

    tm = model if isinstance(model, TrainedModel) else TrainedModel.load(model)
    if keys.SPATIAL not in adata.obsm:
        raise GnnstError(f"gnnst.tl.predict: adata has no obsm['{keys.SPATIAL}'] (spot centres in full-resolution pixels)")
    xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or adata.n_obs == 0:
        raise GnnstError(f"gnnst.tl.predict: obsm['{keys.SPATIAL}'] must be [N, 2] with N > 0, got shape {list(xy.shape)}")
    lib = _library_id(adata, library_id)
    opened, path_label, scalef, image_id = _slide_image(adata, image, lib)
    mpp = _mpp(adata, mpp, lib, spot_diameter_um, opened, path_label if opened is None else None)
    _warn_small_patches(tm.patch_size_um, mpp / scalef, path_label, lib)
    spots = spots_anndata(xy, [str(b) for b in adata.obs_names], slide_id=lib, mpp=mpp, image=path_label,
                          image_scalef=scalef)
    pred, _, emb = predict_spots(tm, spots, cache_dir=cache_dir, batch_size=batch_size, device=device,
                                 progress=progress, opened=opened, image_id=image_id)
    if copy:
        adata = adata.copy()
    genes = list(tm.panel.genes)
    adata.obsm[keys.PRED] = pd.DataFrame(pred.expression, index=adata.obs_names, columns=genes)
    sd, spot_meta = spot_reliability(tm, pred)
    if sd is not None:
        adata.obsm[keys.SD] = pd.DataFrame(sd, index=adata.obs_names, columns=genes)
    write_ood(adata, pred)
    adata.obsm[encoder_key(tm.encoder.name)] = emb
    rel = tm.gene_reliability(reliable_pcc)
    table = rel.frame()
    names = adata.var_names.astype(str)  # the user's genes: NaN (False) outside the panel
    for col in table.columns:
        fill = False if col == keys.RELIABLE else np.nan
        adata.var[col] = table[col].reindex(names, fill_value=fill).to_numpy()
    if keys.SLIDE_ID not in adata.obs:
        adata.obs[keys.SLIDE_ID] = pd.Categorical([lib] * adata.n_obs)
    meta = dict(adata.uns.get(keys.UNS_GNNST, {}))
    meta.setdefault(keys.MPP, float(mpp))
    meta["version"] = __version__
    fold = tm.fold
    meta[PREDICTION] = {
        "model": {"name": tm.model_name, "fold": str(fold.get("name", "")),
                  "trained_on": [str(s) for s in fold.get("train_slides", [])], "members": len(tm.states),
                  "protocol": tm.protocol, "trained_with": tm.gnnst_version, "encoder": tm.encoder.name},
        "library_id": lib, "image": path_label, keys.IMAGE_SCALEF: float(scalef), "mpp": float(mpp),
        "units": "predicted normalize_total + log1p expression" + (
            f" (target_sum {tm.expression.target_sum:g})" if tm.expression.target_sum else ""),
        "expression": {"target_sum": tm.expression.target_sum, "log1p": tm.expression.log1p},
        "layout": {"pred": f"obsm['{keys.PRED}']", "sd": f"obsm['{keys.SD}']" if sd is not None else None},
        "reliability": {"genes": rel.summary(), "gene_table": table, **spot_meta},
    }
    adata.uns[keys.UNS_GNNST] = meta
    log.info("gnnst.tl.predict: %d genes at %d spots of '%s'\n%s", len(genes), adata.n_obs, lib,
             describe_reliability(meta[PREDICTION]["reliability"]))
    return adata if copy else None


def _library_id(adata: "AnnData", library_id: str | None) -> str:
    """The slide's key in ``uns['spatial']`` / ``obs['slide_id']``; ``adata`` must be one slide."""
    libs = [str(k) for k in adata.uns.get(keys.SPATIAL, {})]
    slides = [str(s) for s in adata.obs[keys.SLIDE_ID].astype(str).unique()] if keys.SLIDE_ID in adata.obs else []
    if len(slides) > 1:
        raise GnnstError(f"gnnst.tl.predict: adata holds {len(slides)} slides (obs['{keys.SLIDE_ID}']: "
                         f"{', '.join(slides[:5])}); predict one slide at a time: adata[adata.obs['{keys.SLIDE_ID}'] == id]")
    if library_id is not None:
        if libs and library_id not in libs:
            raise GnnstError(f"gnnst.tl.predict: library_id '{library_id}' is not in uns['spatial'] (has: {', '.join(libs)})")
        return str(library_id)
    if len(libs) > 1:
        inside = [s for s in slides if s in libs]
        if inside:
            return inside[0]
        raise GnnstError(f"gnnst.tl.predict: uns['spatial'] holds {len(libs)} libraries ({', '.join(libs[:5])}); "
                         f"give library_id")
    return libs[0] if libs else (slides[0] if slides else "slide")


def _slide_image(adata: "AnnData", image, lib: str) -> tuple["SlideImage | None", str, float, str | None]:
    """``(opened image or None, its name, its pixels per full-resolution pixel, cache identity)``.

    A file is opened lazily by the embedding step (``None`` here) unless it is needed for its metadata;
    an in-memory image is wrapped and identified by a digest of its pixels."""
    from gnnst.data.images import SlideImage

    if isinstance(image, (str, Path)):
        if not Path(image).exists():
            raise GnnstError(f"gnnst.tl.predict: image not found: {image}")
        return None, str(image), 1.0, None
    if image is not None:
        return SlideImage.from_array(np.asarray(image), name="<image array>"), "<image array>", 1.0, _digest(image)
    meta = adata.uns.get(keys.UNS_GNNST, {})
    path = meta.get(keys.IMAGE_PATH)
    if path and Path(str(path)).exists():
        return None, str(path), float(meta.get(keys.IMAGE_SCALEF, 1.0)), None
    spatial = adata.uns.get(keys.SPATIAL, {}).get(lib, {})
    images, factors = spatial.get(keys.IMAGES, {}), spatial.get(keys.SCALEFACTORS, {})
    for res, factor in ((keys.HIRES, keys.HIRES_SCALEF), ("lowres", "tissue_lowres_scalef")):
        if res in images and factor in factors:
            name = f"<uns['spatial']['{lib}']['images']['{res}']>"
            arr = np.asarray(images[res])
            return SlideImage.from_array(arr, name=name), name, float(factors[factor]), _digest(arr)
    raise GnnstError(f"gnnst.tl.predict: no image: give image= (the full-resolution H&E), or an AnnData with "
                     f"uns['spatial']['{lib}']['images']['hires'] and its scalefactors, or uns['gnnst']['image_path']")


def _digest(arr) -> str:
    a = np.ascontiguousarray(arr)
    return "array:" + hashlib.sha256(str(a.shape).encode() + str(a.dtype).encode() + a.tobytes()).hexdigest()[:32]


def _mpp(adata: "AnnData", mpp: float | None, lib: str, spot_diameter_um: float, opened, path: str | None) -> float:
    """Micrometres per full-resolution pixel (see :func:`predict`); ``opened`` / ``path``: the image, whose
    metadata is the last resort."""
    if mpp is None:
        mpp = adata.uns.get(keys.UNS_GNNST, {}).get(keys.MPP)
    if mpp is None:
        d = adata.uns.get(keys.SPATIAL, {}).get(lib, {}).get(keys.SCALEFACTORS, {}).get(keys.SPOT_DIAMETER)
        if d:
            mpp = float(spot_diameter_um) / float(d)
    if mpp is None and opened is not None:
        mpp = opened.mpp
    if mpp is None and path is not None:
        from gnnst.data.images import open_image

        with open_image(path) as im:
            mpp = im.mpp
    if mpp is None or not np.isfinite(float(mpp)) or float(mpp) <= 0:
        raise GnnstError(f"gnnst.tl.predict: micrometres per pixel unknown ({mpp!r}): give mpp=, or an AnnData with "
                         f"uns['spatial']['{lib}']['scalefactors']['{keys.SPOT_DIAMETER}']")
    return float(mpp)


def _warn_small_patches(size_um: float, image_mpp: float, image: str, lib: str) -> None:
    from gnnst.data.readers import MIN_PATCH_PX

    side = size_um / image_mpp
    if side < MIN_PATCH_PX:
        log.warning("slide %s: UNRELIABLE: %g µm patches are only %.0f px wide in %s (%.4g µm/px, under %d px); "
                    "predictions from this image are unreliable: give the full-resolution H&E as image=", lib,
                    size_um, side, image, image_mpp, MIN_PATCH_PX)


def predicted(adata: "AnnData", gene: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(prediction [N], sd [N] or None)`` of ``gene`` in either layout: a prediction file
    (``layers['gnnst_pred']``, ``var_names`` = the panel) or what :func:`predict` wrote (``obsm`` DataFrames)."""
    if keys.PRED in adata.obsm:
        frame = adata.obsm[keys.PRED]
        if gene not in frame.columns:
            raise GnnstError(f"gene '{gene}' is not in the model's panel ({frame.shape[1]} genes in obsm['{keys.PRED}'])")
        sd = adata.obsm[keys.SD][gene].to_numpy() if keys.SD in adata.obsm else None
        return frame[gene].to_numpy(), sd
    if keys.PRED in adata.layers:
        if gene not in adata.var_names:
            raise GnnstError(f"gene '{gene}' is not in the model's panel ({adata.n_vars} genes)")
        j = adata.var_names.get_loc(gene)
        sd = np.asarray(adata.layers[keys.SD][:, j]).ravel() if keys.SD in adata.layers else None
        return np.asarray(adata.layers[keys.PRED][:, j]).ravel(), sd
    raise GnnstError(f"no gnnst predictions in this AnnData (neither obsm['{keys.PRED}'] nor layers['{keys.PRED}']); "
                     f"run gnnst.tl.predict first")


def measured(adata: "AnnData", gene: str) -> np.ndarray | None:
    """Measured normalised log expression ``[N]`` of ``gene``, or ``None``: ``X`` of a prediction file of a
    held-out slide, or ``X`` of a user's AnnData when it holds the gene (counts are normalised as the model's
    targets were: ``normalize_total`` to its ``target_sum`` over all of ``X``'s genes, then ``log1p``)."""
    import scipy.sparse as sp

    from gnnst.predictions import MEASURED

    meta = adata.uns.get(keys.UNS_GNNST, {})
    if gene not in adata.var_names or adata.X is None:
        return None
    col = adata.X[:, adata.var_names.get_loc(gene)]
    col = np.asarray(col.todense() if sp.issparse(col) else col, dtype=np.float64).ravel()
    if keys.PRED in adata.layers:  # a prediction file: X is measured only for held-out slides
        return col if meta.get("X") == MEASURED else None
    expr = meta.get(PREDICTION, {}).get("expression", {})
    X = adata.X
    vals = (X.data if sp.issparse(X) else np.asarray(X)).ravel()
    if vals.size and vals.min() >= 0 and np.array_equal(vals[:100000], np.round(vals[:100000])):  # counts
        totals = np.asarray(X.sum(1), dtype=np.float64).ravel()
        target = expr.get("target_sum") or (float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0)
        col = col / np.maximum(totals, 1e-12) * float(target)
        if expr.get("log1p", True):
            col = np.log1p(col)
    return col
