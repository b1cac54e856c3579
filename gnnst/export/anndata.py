"""A train run's predictions as AnnData that scanpy and squidpy use unchanged.

An exported slide is its prediction file (the one layout of :mod:`gnnst.predictions`: measured
expression in ``X``, predictions in ``layers['gnnst_pred']``, pixels in ``obsm['spatial']``, the
patch embeddings, the gnnst graph in ``obsp`` where ``sq.gr.spatial_neighbors`` would write its own,
``uns['gnnst']``) plus the H&E under ``uns['spatial'][<slide_id>]`` in scanpy's Visium layout and the
run folder in ``uns['gnnst']['run']``. Several slides concatenate with ``obs['slide_id']`` (squidpy's
``library_key``) and a block-diagonal graph.

``export_run`` reads a ``gnnst train`` output folder through :mod:`gnnst.eval.run`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from gnnst import __version__, keys
from gnnst.errors import GnnstError
from gnnst.io import to_json
# re-exported, part of the export API: one slide of a run, its graph and its image as AnnData
from gnnst.eval.run import read_run_metrics, select_run_slides, slide_from_run
from gnnst.graph.neighbors import add_spatial_graph  # noqa: F401
from gnnst.predictions import HIRES_MAX_SIDE, add_image  # noqa: F401

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger("gnnst")

CONCAT_FILE = "all_slides.h5ad"  # name of the concatenated export


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
        "metrics": to_json({s: json.loads(m.get("metrics", "{}")) for s, m in slides_meta.items()}),
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
    adatas = {s: slide_from_run(run, s, image=image, max_side=max_side, spot_diameter_um=spot_diameter_um)
              for s in slides}
    written = []
    if concat:
        summary = {"metrics": to_json(metrics["summary"])} if metrics.get("summary") else {}
        if metrics.get("config"):
            summary["config"] = to_json(metrics["config"])
        a = concat_slides(adatas, uns={"run": str(run.resolve()), **summary})
        targets = {out / CONCAT_FILE: a}
    else:
        targets = {out / f"{s}.h5ad": a for s, a in adatas.items()}
    for path, a in targets.items():
        atomic_write_h5ad(a, path)
        log.info("exported %d spots x %d genes -> %s", a.n_obs, a.n_vars, path)
        written.append(path)
    return written
