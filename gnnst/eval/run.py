"""Reading a ``gnnst train`` output folder: its held-out slides' prediction files (the layout of
:mod:`gnnst.predictions`), ``metrics.json`` and the fold models. Figures and export read runs only
through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

    from gnnst.predictor import TrainedModel


def run_slides(run: str | Path) -> list[str]:
    """Held-out slides with predictions in a ``gnnst train`` output folder, in file-name order."""
    run = Path(run)
    pred = run / "predictions"
    if not run.is_dir():
        raise GnnstError(f"run folder not found: {run}")
    slides = sorted(p.stem for p in pred.glob("*.h5ad")) if pred.is_dir() else []
    if not slides:
        raise GnnstError(f"{run}: no predictions/<slide>.h5ad; is this a `gnnst train --out` folder?")
    return slides


def select_run_slides(run: str | Path, slides: Sequence[str] | None) -> list[str]:
    """``slides`` (default: all of :func:`run_slides`); one without predictions in ``run`` raises."""
    have = run_slides(run)
    chosen = list(slides) if slides else have
    missing = [s for s in chosen if s not in have]
    if missing:
        raise GnnstError(f"{run}: no predictions for slide '{missing[0]}' (have: {', '.join(have)})")
    return chosen


def read_run_metrics(run: str | Path) -> dict:
    """``metrics.json`` of a train run (``{}`` when the run has not finished)."""
    path = Path(run) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GnnstError(f"{path}: corrupt JSON ({e})") from None


def fold_model(run: str | Path, fold: str) -> "TrainedModel":
    """The model of one fold, ``folds/<fold>/model.pt`` (``fold='final'``: the final model)."""
    from gnnst.predictor import TrainedModel

    run = Path(run)
    return TrainedModel.load(run / "final" / "model.pt" if fold == "final" else run / "folds" / fold / "model.pt")


def read_prediction(run: str | Path, slide_id: str) -> "AnnData":
    """``predictions/<slide_id>.h5ad`` of a run, checked to be a gnnst prediction file."""
    import anndata as ad

    run = Path(run)
    path = run / "predictions" / f"{slide_id}.h5ad"
    if not path.is_file():
        raise GnnstError(f"{run}: no predictions for slide '{slide_id}' (have: {', '.join(run_slides(run))})")
    try:
        a = ad.read_h5ad(path)
    except Exception as e:
        raise GnnstError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    meta = a.uns.get(keys.UNS_GNNST, {})
    for need in ("model", keys.MPP, "graph"):
        if need not in meta:
            raise GnnstError(f"{path}: uns['gnnst'] lacks '{need}'; not a gnnst prediction file of this version")
    if keys.PRED not in a.layers or keys.SPATIAL not in a.obsm or keys.CONNECTIVITIES not in a.obsp:
        raise GnnstError(f"{path}: needs layers['{keys.PRED}'], obsm['{keys.SPATIAL}'] and obsp['{keys.CONNECTIVITIES}']")
    return a


def slide_from_run(run: str | Path, slide_id: str, *, image: bool = True, max_side: int | None = None,
                   spot_diameter_um: float | None = None) -> "AnnData":
    """One held-out slide of a train run as a scanpy/squidpy-ready AnnData.

    Args:
        run: the ``gnnst train --out`` folder.
        slide_id: a slide with ``predictions/<slide_id>.h5ad``.
        image: attach the H&E (:func:`gnnst.predictions.add_image`); needs the image file the run was
            trained on.
        max_side, spot_diameter_um: see :func:`gnnst.predictions.add_image` (``max_side=None``: its default).

    Returns the prediction file (layout of :mod:`gnnst.predictions`, graph included) with
    ``uns['spatial'][slide_id]`` when ``image``, and the run folder in ``uns['gnnst']['run']``.
    """
    from gnnst.predictions import HIRES_MAX_SIDE, add_image

    run = Path(run)
    a = read_prediction(run, slide_id)
    meta = dict(a.uns[keys.UNS_GNNST])
    if image:
        add_image(a, image_path(run, slide_id, meta), library_id=slide_id, mpp=float(meta[keys.MPP]),
                  spot_diameter_um=spot_diameter_um, max_side=max_side or HIRES_MAX_SIDE,
                  image_scalef=float(meta.get(keys.IMAGE_SCALEF, 1.0)))
    a.uns[keys.UNS_GNNST]["run"] = str(run.resolve())
    return a


def image_path(run: str | Path, slide_id: str, meta: dict) -> Path:
    """The slide's full-resolution image: from the prediction file's ``uns['gnnst']`` (``meta``), else via
    the run's config and manifest."""
    p = meta.get(keys.IMAGE_PATH)
    if p and Path(p).is_file():
        return Path(p)
    from gnnst.config import load_config
    from gnnst.data.manifest import load_manifest, resolve_files

    hint = "export without the image (--no-image) or run from the folder the run was trained in"
    cfg_path = Path(run) / "config.yaml"
    try:
        cfg = load_config(cfg_path)
        manifest = load_manifest(cfg.data.manifest)
        files = resolve_files(manifest, manifest.slide(slide_id), data_root=cfg.data.data_root,
                              cache_dir=cfg.data.cache_dir, download=False, verify=False)
    except GnnstError as e:
        raise GnnstError(f"slide '{slide_id}': image not found ({p or 'no image_path in the prediction file'}); "
                         f"via {cfg_path}: {e}; {hint}") from None
    if "image" not in files:
        raise GnnstError(f"slide '{slide_id}': the manifest {manifest.path} lists no image; {hint}")
    return Path(files["image"])
