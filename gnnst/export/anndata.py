"""Predictions and graphs back to AnnData that scanpy and squidpy use unchanged.

An exported slide carries the measured (normalised) expression in ``X``, the predictions in
``layers['gnnst_pred']``, pixels in ``obsm['spatial']``, the patch embeddings in
``obsm['X_img_<encoder>']``, the gnnst spot graph where ``sq.gr.spatial_neighbors`` would write
its own (``obsp['spatial_connectivities']``, ``obsp['spatial_distances']``,
``uns['spatial_neighbors']``), the H&E image under ``uns['spatial'][<slide_id>]`` in scanpy's
Visium layout, and ``uns['gnnst']`` (version, config, metrics). Several slides concatenate with
``obs['slide_id']`` (squidpy's ``library_key``) and a block-diagonal graph.

``export_run`` reads a ``gnnst train`` output folder: ``predictions/<slide>.h5ad`` and, for the
graph parameters of each held-out slide, ``folds/<fold>/model.pt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from gnnst import __version__, keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger("gnnst")

HIRES_MAX_SIDE = 2000  # longer side of uns['spatial'][slide]['images']['hires'] (Space Ranger's hires size)
CONCAT_FILE = "all_slides.h5ad"  # name of the concatenated export


# --- graph ---------------------------------------------------------------------------------
def graph_from_pixels(pixel: np.ndarray, mpp: float, *, k: int | None, radius_um: float | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The gnnst spot graph of one slide, rebuilt from pixel coordinates.

    Args:
        pixel: spot centres ``[N, 2]`` in full-resolution pixels (x, y).
        mpp: micrometres per pixel.
        k, radius_um: graph parameters (see :func:`gnnst.graph.edges.spatial_edges`).

    Returns:
        ``edge_index`` ``[2, E]`` (row 0 neighbour, row 1 centre) and the edge lengths ``[E]`` in µm.
    """
    from gnnst.graph.edges import spatial_edges

    pos = np.asarray(pixel, dtype=np.float64) * float(mpp)  # [N, 2] µm
    ei = spatial_edges(pos, k=k, radius_um=radius_um)
    return ei, np.linalg.norm(pos[ei[0]] - pos[ei[1]], axis=1)


def add_spatial_graph(
    adata: "AnnData",
    edge_index: np.ndarray,
    distances: np.ndarray,
    *,
    k: int | None = None,
    radius_um: float | None = None,
    key_added: str = keys.SPATIAL,
    copy: bool = False,
) -> "AnnData | None":
    """Store a gnnst graph the way ``sq.gr.spatial_neighbors`` stores its own.

    Args:
        adata: the graph's spots, in node order.
        edge_index: ``[2, E]``, row 0 the neighbour (source), row 1 the centre spot (target).
        distances: ``[E]`` edge lengths in µm.
        k, radius_um: the graph parameters, recorded in ``uns[...]['params']``.
        key_added: prefix of the keys, as in squidpy.
        copy: return a modified copy instead of writing into ``adata``.

    Sets the following fields (squidpy's convention: row = spot, column = one of its neighbours):
        ``adata.obsp['{key_added}_connectivities']`` ``[N, N]`` CSR float32 (1 per edge),
        ``adata.obsp['{key_added}_distances']`` ``[N, N]`` CSR float64 (µm),
        ``adata.uns['{key_added}_neighbors']`` (``connectivities_key``, ``distances_key``, ``params``).
    """
    import scipy.sparse as sp

    if copy:
        adata = adata.copy()
    n = adata.n_obs
    src, dst = np.asarray(edge_index, dtype=np.int64)
    if len(src) and (max(src.max(), dst.max()) >= n or min(src.min(), dst.min()) < 0):
        raise GnnstError(f"spatial graph: an edge names spot {max(src.max(), dst.max())}, but there are {n} spots")
    conn = sp.csr_matrix((np.ones(len(src), dtype=np.float32), (dst, src)), shape=(n, n))
    dist = sp.csr_matrix((np.asarray(distances, dtype=np.float64), (dst, src)), shape=(n, n))
    conn.sort_indices()
    dist.sort_indices()
    conn_key, dist_key = f"{key_added}_connectivities", f"{key_added}_distances"
    adata.obsp[conn_key] = conn
    adata.obsp[dist_key] = dist
    adata.uns[f"{key_added}_neighbors"] = {
        "connectivities_key": conn_key, "distances_key": dist_key,
        "params": {"coord_type": "generic", "n_neighbors": k, "radius": radius_um, "transform": None,
                   "units": "um", "source": "gnnst"},
    }
    return adata if copy else None


# --- image ---------------------------------------------------------------------------------
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


# --- a train run -----------------------------------------------------------------------------
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


def fold_graph_params(run: str | Path, fold: str) -> dict:
    """``{'k', 'radius_um'}`` the fold's model was trained with, from ``folds/<fold>/model.pt``."""
    from gnnst.inference import load_checkpoint

    ck = load_checkpoint(Path(run) / "folds" / fold / "model.pt")
    return {"k": ck["graph"]["k"], "radius_um": ck["graph"]["radius_um"]}


def slide_from_run(
    run: str | Path,
    slide_id: str,
    *,
    image: bool = True,
    max_side: int = HIRES_MAX_SIDE,
    spot_diameter_um: float | None = None,
    metrics: dict | None = None,
) -> "AnnData":
    """One held-out slide of a train run as a scanpy/squidpy-ready AnnData.

    Args:
        run: the ``gnnst train --out`` folder.
        slide_id: a slide with ``predictions/<slide_id>.h5ad``.
        image: attach the H&E (see :func:`add_image`); needs the image file the run was trained on.
        max_side, spot_diameter_um: see :func:`add_image`.
        metrics: the run's ``metrics.json`` if already read.

    Returns the prediction file's ``X``, ``layers['gnnst_pred']``, ``obs``, ``obsm`` plus the fields
    written by :func:`add_spatial_graph` (the fold's graph, rebuilt from pixels x mpp) and
    :func:`add_image`, and ``uns['gnnst']`` (version, run, fold, mpp, graph, config, metrics).
    """
    import anndata as ad
    import pandas as pd

    run = Path(run)
    path = run / "predictions" / f"{slide_id}.h5ad"
    if not path.is_file():
        raise GnnstError(f"{run}: no predictions for slide '{slide_id}' (have: {', '.join(run_slides(run))})")
    try:
        a = ad.read_h5ad(path)
    except Exception as e:
        raise GnnstError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    meta = dict(a.uns.get(keys.UNS_GNNST, {}))
    for need in ("fold", keys.MPP):
        if need not in meta:
            raise GnnstError(f"{path}: uns['gnnst'] lacks '{need}'; not a gnnst prediction file")
    if keys.PRED not in a.layers or keys.SPATIAL not in a.obsm:
        raise GnnstError(f"{path}: needs layers['{keys.PRED}'] and obsm['{keys.SPATIAL}']")
    mpp = float(meta[keys.MPP])
    graph = fold_graph_params(run, str(meta["fold"]))
    ei, dist = graph_from_pixels(a.obsm[keys.SPATIAL], mpp, **graph)
    add_spatial_graph(a, ei, dist, k=graph["k"], radius_um=graph["radius_um"])
    a.obs[keys.SLIDE_ID] = pd.Categorical([slide_id] * a.n_obs)
    if image:
        add_image(a, _image_path(run, slide_id, meta), library_id=slide_id, mpp=mpp,
                  spot_diameter_um=spot_diameter_um, max_side=max_side,
                  image_scalef=float(meta.get(keys.IMAGE_SCALEF, 1.0)))
    metrics = read_run_metrics(run) if metrics is None else metrics
    slide_metrics = json.loads(meta.get("metrics", "{}"))
    for f in metrics.get("folds", []):
        if slide_id in f.get("per_slide", {}):
            slide_metrics["per_slide"] = f["per_slide"][slide_id]
    enc = next((k[len(keys.img_key("")):] for k in a.obsm if k.startswith(keys.img_key(""))), None)
    a.uns[keys.UNS_GNNST] = {
        "version": __version__, "trained_with": str(meta.get("version", "")), "run": str(run.resolve()),
        keys.SLIDE_ID: slide_id, "fold": str(meta["fold"]), "patient_disjoint": bool(meta.get("patient_disjoint")),
        keys.MPP: mpp, "encoder": enc, "graph": {**graph, "units": "um"},
        "X": str(meta.get("X", "normalize_total + log1p of measured counts")),
        "layers": {keys.PRED: "predicted normalize_total + log1p expression (held-out slide)"},
        "config": str(meta.get("config", "{}")), "metrics": json.dumps(slide_metrics),
    }
    if meta.get(keys.IMAGE_PATH):
        a.uns[keys.UNS_GNNST][keys.IMAGE_PATH] = str(meta[keys.IMAGE_PATH])
        a.uns[keys.UNS_GNNST][keys.IMAGE_SCALEF] = float(meta.get(keys.IMAGE_SCALEF, 1.0))
    return a


def _image_path(run: Path, slide_id: str, meta: dict) -> Path:
    """The slide's full-resolution image: from the prediction file, else via the run's manifest."""
    p = meta.get(keys.IMAGE_PATH)
    if p and Path(p).is_file():
        return Path(p)
    from gnnst.config import load_config
    from gnnst.data.manifest import load_manifest, resolve_files

    hint = "export without the image (--no-image) or run from the folder the run was trained in"
    cfg_path = run / "config.yaml"
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


# --- several slides --------------------------------------------------------------------------
def concat_slides(adatas: Sequence["AnnData"] | Mapping[str, "AnnData"], *, join: str = "inner",
                  uns: dict | None = None) -> "AnnData":
    """Spots of several exported slides in one AnnData.

    Args:
        adatas: exported slides (each with one value of ``obs['slide_id']``), or slide id -> slide.
        join: genes kept: ``"inner"`` (in every slide's panel; folds choose their own panels) or
            ``"outer"`` (missing values become 0).
        uns: extra entries for ``uns['gnnst']`` (e.g. the run's metrics).

    Returns an AnnData with obs names ``<barcode>-<slide_id>``, ``obs['slide_id']`` categorical in
    input order, ``X``/``layers``/``obsm`` stacked, ``obsp`` block-diagonal (no edge between slides),
    ``uns['spatial']`` holding every slide's image, ``uns['spatial_neighbors']`` and ``uns['gnnst']``
    with version, config, metrics and ``slides`` (each slide's own ``uns['gnnst']``).
    """
    import anndata as ad
    import pandas as pd

    items = dict(adatas) if isinstance(adatas, Mapping) else {str(a.obs[keys.SLIDE_ID].iloc[0]): a for a in adatas}
    if not items:
        raise GnnstError("concat_slides: no slides given")
    if join not in ("inner", "outer"):
        raise GnnstError(f"concat_slides: join must be 'inner' or 'outer', got {join!r}")
    for s, a in items.items():
        ids = a.obs[keys.SLIDE_ID].astype(str).unique()
        if len(ids) != 1 or ids[0] != s:
            raise GnnstError(f"concat_slides: slide '{s}' has obs['{keys.SLIDE_ID}'] values {list(ids)}")
    out = ad.concat(items, join=join, index_unique="-", pairwise=True, fill_value=0 if join == "outer" else None)
    out.obs[keys.SLIDE_ID] = pd.Categorical(out.obs[keys.SLIDE_ID].astype(str), categories=list(items))
    n_genes = {s: a.n_vars for s, a in items.items()}
    if join == "inner" and any(v != out.n_vars for v in n_genes.values()):
        log.info("concatenated %d slides on the %d genes in every panel (panels: %s)", len(items), out.n_vars, n_genes)
    images = {s: a.uns[keys.SPATIAL][s] for s, a in items.items() if s in a.uns.get(keys.SPATIAL, {})}
    if images:
        out.uns[keys.SPATIAL] = images
    first = next(iter(items.values()))
    if keys.NEIGHBORS in first.uns:
        out.uns[keys.NEIGHBORS] = dict(first.uns[keys.NEIGHBORS])
    slides_meta = {s: dict(a.uns.get(keys.UNS_GNNST, {})) for s, a in items.items()}
    out.uns[keys.UNS_GNNST] = {
        "version": __version__, "config": str(next(iter(slides_meta.values())).get("config", "{}")),
        "metrics": json.dumps({s: json.loads(m.get("metrics", "{}")) for s, m in slides_meta.items()}),
        "slides": slides_meta, "genes_per_slide": n_genes, "join": join, **(uns or {}),
    }
    return out


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    slides: Sequence[str] | None = None,
    concat: bool = False,
    image: bool = True,
    max_side: int = HIRES_MAX_SIDE,
    spot_diameter_um: float | None = None,
) -> list[Path]:
    """Write a train run's held-out slides as scanpy/squidpy-ready ``.h5ad`` files.

    Args:
        run: the ``gnnst train --out`` folder.
        out: output folder: ``<slide>.h5ad`` per slide, or one ``all_slides.h5ad`` with ``concat``.
        slides: export only these (default: every slide with predictions).
        concat: one file with ``obs['slide_id']`` and a block-diagonal graph (see :func:`concat_slides`).
        image, max_side, spot_diameter_um: see :func:`slide_from_run`.

    Returns the paths written.
    """
    from gnnst.io import atomic_write_h5ad

    run, out = Path(run), Path(out)
    slides = select_run_slides(run, slides)
    metrics = read_run_metrics(run)
    adatas = {s: slide_from_run(run, s, image=image, max_side=max_side, spot_diameter_um=spot_diameter_um,
                                metrics=metrics) for s in slides}
    written = []
    if concat:
        summary = {"metrics": json.dumps(metrics["summary"])} if metrics.get("summary") else {}
        if metrics.get("config"):
            summary["config"] = json.dumps(metrics["config"])
        a = concat_slides(adatas, uns={"run": str(run.resolve()), **summary})
        targets = {out / CONCAT_FILE: a}
    else:
        targets = {out / f"{s}.h5ad": a for s, a in adatas.items()}
    for path, a in targets.items():
        atomic_write_h5ad(a, path)
        log.info("exported %d spots x %d genes -> %s", a.n_obs, a.n_vars, path)
        written.append(path)
    return written
