"""The one writer of predictions as AnnData, used by cross-validation (``OUT/predictions/<slide>.h5ad``),
``gnnst predict`` (spots and grid) and ``gnnst export``; files are written with
:func:`gnnst.io.atomic_write_h5ad`.

Layout of a prediction (:func:`prediction_anndata`):

- ``X`` ``[N, G]``: measured normalised expression (``normalize_total`` + ``log1p``) where it exists
  (held-out slides of a run), else the prediction; ``uns['gnnst']['X']`` says which;
- ``layers['gnnst_pred']`` ``[N, G]``: predicted expression, same genes (``var_names`` = the panel);
- ``layers['gnnst_sd']`` ``[N, G]``: sd of the ensemble members' predictions (absent for a single-member
  model: ``uns['gnnst']['reliability']['sd']`` says so); the interval ``pred +- z * scale * sd`` with the
  scale and z of ``uns['gnnst']['reliability']['sd']`` covered the nominal level on validation spots;
- ``var['gnnst_cv_pcc']``, ``var['gnnst_cv_pcc_sd']``, ``var['gnnst_cv_pcc_new_patient']`` (float, NaN
  where the model has no cross-validated PCC: fold models, genes in no fold's panel) and
  ``var['gnnst_reliable']`` (bool: ``gnnst_cv_pcc`` >= the threshold in ``uns['gnnst']['reliability']``);
- ``obs['gnnst_ood_score']`` (float; 1 = a typical training spot seen from a new slide) and
  ``obs['gnnst_ood']`` (bool: out of the training distribution), when the model has an OOD reference;
- ``obs['slide_id']`` (categorical; squidpy's ``library_key``), obs names = spot barcodes;
- ``obsm['spatial']`` ``[N, 2]`` full-resolution pixels (x, y); ``obsm['X_img_<encoder>']`` ``[N, D]``;
- ``obsp['spatial_connectivities']``, ``obsp['spatial_distances']`` (µm), ``uns['spatial_neighbors']``:
  the gnnst graph the model saw, where ``sq.gr.spatial_neighbors`` would write its own;
- ``uns['spatial'][<slide_id>]``: H&E thumbnail and scale factors (scanpy's Visium layout; written by
  :func:`add_image` for grid predictions and exports);
- ``uns['gnnst']``:

  ====================  =========================================================================
  ``version``           gnnst version that wrote the file
  ``slide_id``          the slide
  ``mpp``               micrometres per full-resolution pixel
  ``image_path``        the slide's image (absolute; absent when unknown)
  ``image_scalef``      pixels of that image per full-resolution pixel (1.0 unless the slide came with
                        only a downscaled image, e.g. Space Ranger's hires PNG)
  ``X``                 what ``X`` holds
  ``layers``            ``{'gnnst_pred': what the layer holds}``
  ``encoder``           patch encoder name (the ``obsm`` key's suffix)
  ``model``             ``name``, ``fold``, ``trained_on`` (slides), ``held_out`` (slides),
                        ``patient_disjoint``, ``members``, ``blend_alpha``, ``protocol``,
                        ``trained_with`` (gnnst version)
  ``graph``             ``k``, ``radius_um``, ``units`` (``'um'``)
  ``config``            JSON of the training run's resolved config (``'{}'`` when unknown)
  ``metrics``           JSON of this slide's scores (:func:`gnnst.metrics.slide_scores`; ``'{}'`` when
                        nothing was measured)
  ``reliability``       ``genes`` (threshold, n_reliable, n_genes, n_estimated, source, definition),
                        ``sd`` (scale, level, z, interval, ... or ``'none: ...'``), ``ood`` (k, quantile,
                        threshold, n_flagged, ... or ``'none: ...'``): :mod:`gnnst.reliability`
  ``grid``              grid predictions only: kind, pitch, supersampling, tissue threshold/fraction
  ``run``               exports only: the run folder
  ====================  =========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import __version__, keys
from gnnst.io import to_json

if TYPE_CHECKING:
    from anndata import AnnData
    from torch_geometric.data import Data

    from gnnst.graph.edges import SlideGraph
    from gnnst.predictor import Prediction, TrainedModel

HIRES_MAX_SIDE = 2000  # longer side of uns['spatial'][slide]['images']['hires'] (Space Ranger's hires size)
MEASURED = "measured normalize_total + log1p expression"  # uns['gnnst']['X'] of held-out slides
PREDICTED = "predicted normalize_total + log1p expression"  # uns['gnnst']['X'] without measurements


def encoder_key(name: str) -> str:
    """The ``obsm`` key of an encoder's embeddings (``X_img_<name>``, unsafe characters replaced)."""
    return keys.img_key("".join(c if c.isalnum() or c in "-_" else "_" for c in name))


def prediction_anndata(
    model: "TrainedModel",
    pred: "Prediction | np.ndarray",
    *,
    slide_id: str,
    barcodes: Sequence[str],
    pixel: np.ndarray,
    mpp: float,
    graph: "SlideGraph | Data",
    embeddings: np.ndarray | None = None,
    measured: np.ndarray | None = None,
    image_path: str | Path | None = None,
    image_scalef: float = 1.0,
    config: dict | None = None,
    metrics: dict | None = None,
    reliable_pcc: float | None = None,
) -> "AnnData":
    """One slide's prediction as AnnData in the layout of the module docstring.

    Args:
        model: the model that predicted (panel, encoder, fold, graph parameters, reliability).
        pred: the :class:`~gnnst.predictor.Prediction` (expression, members for the sd, OOD scores), or
            only its ``[N, G]`` expression (panel order; then no sd and no OOD fields).
        slide_id, barcodes, pixel: the spots (``pixel`` ``[N, 2]`` full-resolution x, y).
        mpp: micrometres per pixel.
        graph: the slide's graph in spot order: a :class:`~gnnst.graph.edges.SlideGraph`
            (:meth:`TrainedModel.slide_graph`) or the slide's ``Data`` (``edge_index``, ``edge_attr``).
        embeddings: ``[N, D]`` patch embeddings, stored in ``obsm``.
        measured: ``[N, G]`` measured normalised expression (held-out slides), stored in ``X``.
        image_path: the slide's image file.
        image_scalef: pixels of that image per full-resolution pixel (below 1 for Space Ranger's
            hires/lowres PNG; see :mod:`gnnst.data.validate`).
        config: the training run's resolved config (as a dict).
        metrics: this slide's scores.
        reliable_pcc: the PCC a gene needs for ``var['gnnst_reliable']`` (default: the model's
            ``reliability.reliable_pcc``).
    """
    import anndata as ad
    import pandas as pd

    from gnnst.graph.neighbors import add_spatial_graph

    full = None if isinstance(pred, np.ndarray) else pred
    pred = np.asarray(pred if full is None else full.expression, dtype=np.float32)
    obs = pd.DataFrame(index=pd.Index([str(b) for b in barcodes], name=keys.BARCODE))
    obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * len(obs))
    X = pred.copy() if measured is None else np.asarray(measured, dtype=np.float32)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(list(model.panel.genes))))
    a.layers[keys.PRED] = pred
    a.obsm[keys.SPATIAL] = np.asarray(pixel, dtype=np.float64)
    if embeddings is not None:
        a.obsm[encoder_key(model.encoder.name)] = np.asarray(embeddings, dtype=np.float32)
    edge_attr = np.asarray(graph.edge_attr, dtype=np.float64)  # [E, 3] (dx, dy, distance) µm
    add_spatial_graph(a, np.asarray(graph.edge_index), edge_attr[:, 2], k=model.graph.k,
                      radius_um=model.graph.radius_um)
    fold = model.fold
    meta = {
        "version": __version__, keys.SLIDE_ID: str(slide_id), keys.MPP: float(mpp),
        "X": PREDICTED if measured is None else MEASURED,
        "layers": {keys.PRED: PREDICTED + (" (held-out slide)" if measured is not None else "")},
        "encoder": model.encoder.name,
        "model": {"name": model.model_name, "fold": str(fold.get("name", "")),
                  "trained_on": [str(s) for s in fold.get("train_slides", [])],
                  "held_out": [str(s) for s in fold.get("test_slides", [])],
                  "patient_disjoint": bool(fold.get("patient_disjoint", False)), "members": len(model.states),
                  "blend_alpha": float(model.blend_alpha), "protocol": model.protocol,
                  "trained_with": model.gnnst_version},
        "graph": {"k": model.graph.k, "radius_um": model.graph.radius_um, "units": "um"},
        "config": to_json(config or {}), "metrics": to_json(metrics or {}),  # strict JSON text
    }
    if image_path:
        meta[keys.IMAGE_PATH] = str(Path(image_path).resolve())
        meta[keys.IMAGE_SCALEF] = float(image_scalef)
    meta["reliability"] = add_reliability(a, model, full, reliable_pcc=reliable_pcc)
    a.uns[keys.UNS_GNNST] = meta
    return a


def add_reliability(adata: "AnnData", model: "TrainedModel", pred: "Prediction | None", *,
                    reliable_pcc: float | None = None) -> dict:
    """Write the reliability fields of the module docstring into ``adata`` (``var_names`` = the panel, spots
    in ``pred``'s order) and return what ``uns['gnnst']['reliability']`` records."""
    genes = model.gene_reliability(reliable_pcc)
    frame = genes.frame()
    for col in frame.columns:
        adata.var[col] = frame[col].to_numpy()
    sd, meta = spot_reliability(model, pred)
    if sd is not None:
        adata.layers[keys.SD] = sd
    write_ood(adata, pred)
    return {"genes": genes.summary(), **meta}


def spot_reliability(model: "TrainedModel", pred: "Prediction | None") -> tuple[np.ndarray | None, dict]:
    """``(sd [N, G] or None, {'sd': ..., 'ood': ...})``: the ensemble spread of ``pred`` and the ``sd`` and
    ``ood`` entries of ``uns['gnnst']['reliability']`` (a ``'none: ...'`` string where there is nothing)."""
    from gnnst.reliability import SD_DEFINITION

    sd = None if pred is None else pred.sd
    if sd is None:
        why = ("a single-member model has no ensemble spread (train with train.ensemble >= 2)" if len(model.states) < 2
               else "the members' predictions were not kept")
        sd_meta: dict | str = f"none: {why}"
    else:
        sd_meta = {"members": len(model.states), "definition": SD_DEFINITION,
                   **(model.calibration.summary() if model.calibration is not None else
                      {"interval": "none: no calibration in the model"})}
    if pred is None or pred.ood_score is None:
        ood_meta: dict | str = ("none: the model has no OOD reference (trained before gnnst reliability)"
                                if model.ood_reference is None else "none: not computed")
    else:
        ood_meta = {**model.ood_reference.summary(), "n_flagged": int(np.sum(pred.ood)),
                    "fraction_flagged": float(np.mean(pred.ood)) if len(pred.ood) else 0.0}
    return sd, {"sd": sd_meta, "ood": ood_meta}


def write_ood(adata: "AnnData", pred: "Prediction | None") -> None:
    """``obs['gnnst_ood_score']`` and ``obs['gnnst_ood']`` of ``pred`` (nothing when it has no OOD scores)."""
    if pred is None or pred.ood_score is None:
        return
    adata.obs[keys.OOD_SCORE] = np.asarray(pred.ood_score, dtype=np.float32)
    adata.obs[keys.OOD] = np.asarray(pred.ood, dtype=bool)


def add_image(
    adata: "AnnData",
    image: str | Path,
    *,
    library_id: str,
    mpp: float,
    spot_diameter_um: float | None = None,
    max_side: int = HIRES_MAX_SIDE,
    image_scalef: float = 1.0,
    copy: bool = False,
) -> "AnnData | None":
    """Attach a downsampled H&E with scanpy's Visium scale factors.

    Args:
        adata: spots of one slide, pixels in ``obsm['spatial']``.
        image: the full-resolution image file (any format :func:`gnnst.data.images.open_image` reads).
        library_id: key under ``uns['spatial']`` (the slide id; squidpy's ``library_id``).
        mpp: micrometres per full-resolution pixel.
        spot_diameter_um: physical spot diameter; ``None`` = half the spot pitch (legacy ST: 100 of
            200 µm; Visium: 50 of 100 µm, nominally 55).
        max_side: longer side of the stored image in pixels.
        image_scalef: pixels of ``image`` per full-resolution pixel (``uns['gnnst']['image_scalef']``;
            below 1 when ``image`` is Space Ranger's hires or lowres PNG).
        copy: return a modified copy instead of writing into ``adata``.

    Sets the following fields: ``adata.uns['spatial'][library_id]`` with ``images['hires']``
    ``[h, w, 3]`` uint8, ``scalefactors`` (``tissue_hires_scalef``: hires pixels per full-resolution
    pixel; ``spot_diameter_fullres``: spot diameter in full-resolution pixels) and ``metadata``.
    """
    from gnnst.data.images import open_image

    if copy:
        adata = adata.copy()
    with open_image(image) as im:
        hires = np.ascontiguousarray(im.thumbnail(max_side), dtype=np.uint8)  # [h, w, 3]
        scalef = hires.shape[1] / im.width * float(image_scalef)  # hires px per full-resolution px
    if spot_diameter_um is None:
        diameter_px = 0.5 * _pitch_px(np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64))
    else:
        diameter_px = float(spot_diameter_um) / float(mpp)
    lib = {keys.IMAGES: {keys.HIRES: hires},
           keys.SCALEFACTORS: {keys.HIRES_SCALEF: float(scalef), keys.SPOT_DIAMETER: float(diameter_px)},
           "metadata": {"source_image_path": str(image), keys.MPP: float(mpp)}}
    adata.uns.setdefault(keys.SPATIAL, {})[library_id] = lib
    return adata if copy else None


def _pitch_px(pixel: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot, in pixels."""
    from scipy.spatial import cKDTree

    if len(pixel) < 2:
        return 1.0
    d, _ = cKDTree(pixel).query(pixel, k=2)
    return float(np.median(d[:, 1]))

