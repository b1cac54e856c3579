"""Predictions to a SpatialData zarr store, drawn by ``spatialdata-plot`` unchanged.

Per slide ``S`` (each value of ``obs['slide_id']``) the store holds, all in one coordinate system
named ``S`` whose unit is a full-resolution pixel of the slide's image (``obsm['spatial']``):

- ``images/S_image``: the H&E as a small RGB thumbnail (longer side at most ``max_side`` px, 2000 by
  default, the size of scanpy's ``hires``; one scale), with a scale transformation from its pixels
  to full-resolution pixels. The full-resolution image is not copied.
- ``shapes/S_spots``: one circle per spot (centre ``obsm['spatial']``, radius half the spot diameter),
  or for a ``gnnst predict --grid-um`` result ``shapes/S_grid``: one hexagon or square per grid cell
  (``uns['gnnst']['grid']``: ``kind``, ``pitch_px``), tiling the tissue.
- ``tables/table``: the AnnData itself (``X``, ``layers['gnnst_pred']`` and every other layer,
  ``obs``, ``var``, ``obsm``, ``obsp``, ``uns`` except ``uns['spatial']``, whose images now live in the
  image elements, and an older ``uns['spatialdata_attrs']``) annotating those shapes: ``obs['region']``
  names the shapes element of each row (``region_key``), ``obs['instance_id']`` the row's shape in it
  (``instance_key``).

So ``sdata.pl.render_images().pl.render_shapes(color=GENE).pl.show()`` draws ``X`` of ``GENE`` (the
prediction, for ``gnnst predict`` output) over the H&E; ``table_layer='gnnst_pred'`` draws the
prediction whatever ``X`` holds.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError
from gnnst.export.anndata import HIRES_MAX_SIDE  # longer side of the stored H&E thumbnail (scanpy's hires size)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

log = logging.getLogger("gnnst")

SUFFIX = ".zarr"
SD_ATTRS = "spatialdata_attrs"  # uns key of a table's annotation, set by spatialdata's TableModel


def write_spatialdata(
    adata: "AnnData",
    path: str | Path,
    *,
    image: str | Path | None = None,
    include_image: bool = True,
    max_side: int = HIRES_MAX_SIDE,
    spot_diameter_um: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write predictions as a SpatialData zarr store at ``path`` (see the module docstring).

    Args:
        adata: gnnst predictions (as ``gnnst predict`` or ``gnnst export`` write them): ``obsm['spatial']``
            full-resolution pixels, ``obs['slide_id']``, ``uns['gnnst']``; one slide or several.
        path: the store to create, ending in ``.zarr``. Written under a temporary name and renamed.
        image, include_image, max_side, spot_diameter_um: see :func:`to_spatialdata`.
        overwrite: replace an existing ``path`` (only once the new store is complete); else it is an error.

    Returns ``path``.
    """
    from gnnst.io import atomic_dir

    path = Path(path)
    if path.suffix != SUFFIX:
        raise GnnstError(f"a SpatialData store's name ends in {SUFFIX}, got {path}")
    if path.exists() and not overwrite:
        raise GnnstError(f"{path} exists; choose another path or overwrite it (overwrite=True)")
    sdata = to_spatialdata(adata, image=image, include_image=include_image, max_side=max_side,
                           spot_diameter_um=spot_diameter_um)
    with atomic_dir(path, overwrite=overwrite) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)  # zarr's notice to itself
        try:
            sdata.write(tmp)
        except Exception as e:  # zarr/spatialdata raise many types (disk full, unwritable types)
            raise GnnstError(f"{path}: cannot write the SpatialData store ({type(e).__name__}: {e})") from None
    log.info("wrote %d spots x %d genes of %d slide(s) -> %s", adata.n_obs, adata.n_vars, len(_slides(adata)), path)
    return path


def to_spatialdata(
    adata: "AnnData",
    *,
    image: str | Path | None = None,
    include_image: bool = True,
    max_side: int = HIRES_MAX_SIDE,
    spot_diameter_um: float | None = None,
) -> "SpatialData":
    """The in-memory SpatialData of :func:`write_spatialdata`.

    Args:
        adata: gnnst predictions (see :func:`write_spatialdata`). Not modified.
        image: the slide's image (any format :func:`gnnst.data.images.open_image` reads); only for a
            single slide. Default: ``uns['spatial'][slide]['images']['hires']`` with its
            ``tissue_hires_scalef`` when present (``gnnst predict --grid-um``, ``gnnst export``), else
            the image at ``uns['gnnst']['image_path']`` (with ``image_scalef``), downsampled.
        include_image: ``False`` writes no image element (then no image is needed).
        max_side: longer side of the stored thumbnail when it is made from ``image``.
        spot_diameter_um: circle diameter in µm (needs ``uns['gnnst']['mpp']``). Default:
            ``uns['spatial'][slide]['scalefactors']['spot_diameter_fullres']`` when present, else half
            the median distance between neighbouring spots. Grid cells ignore it.
    """
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    slides = _slides(adata)
    if image is not None and len(slides) > 1:
        raise GnnstError(f"image: one image was given for {len(slides)} slides ({', '.join(slides)}); leave it "
                         f"out to use each slide's own (uns['spatial'] or uns['gnnst']['image_path'])")
    if spot_diameter_um is not None and not spot_diameter_um > 0:
        raise GnnstError(f"spot diameter must be > 0 µm, got {spot_diameter_um}")
    names = {s: _element_name(s) for s in slides}
    if len(set(names.values())) < len(names):
        raise GnnstError(f"slide ids {', '.join(slides)} give the same element name once made safe for zarr")
    slide_of = adata.obs[keys.SLIDE_ID].astype(str).to_numpy()
    images, shapes = {}, {}
    region = np.empty(adata.n_obs, dtype=object)
    instance = np.zeros(adata.n_obs, dtype=np.int64)
    for s in slides:
        rows = np.flatnonzero(slide_of == s)
        meta = _slide_meta(adata, s)
        xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)[rows]  # [n, 2] full-resolution px
        shape_name, shapes[shape_name] = _spot_shapes(xy, adata, s, meta, cs=s, spot_diameter_um=spot_diameter_um,
                                                      prefix=names[s])
        region[rows] = shape_name
        instance[rows] = np.arange(len(rows))
        if include_image:
            images[f"{names[s]}_image"] = _image_element(adata, s, meta, image, cs=s, max_side=max_side)
    from gnnst.io import _plain_strings  # string columns every anndata reads, under pandas 2 and 3

    table = ad.AnnData(X=adata.X, obs=_plain_strings(adata.obs), var=_plain_strings(adata.var),
                       layers=dict(adata.layers), obsm=dict(adata.obsm), obsp=dict(adata.obsp),
                       uns={k: v for k, v in adata.uns.items() if k not in (keys.SPATIAL, SD_ATTRS)})
    table.obs[keys.SD_REGION] = pd.Categorical(region, categories=list(shapes))
    table.obs[keys.SD_INSTANCE] = instance
    regions = list(shapes) if len(shapes) > 1 else list(shapes)[0]  # one region: a name, as spatialdata-io writes
    table = TableModel.parse(table, region=regions, region_key=keys.SD_REGION, instance_key=keys.SD_INSTANCE)
    return SpatialData(images=images, shapes=shapes, tables={keys.SD_TABLE: table})


def _slides(adata: "AnnData") -> list[str]:
    """The slide ids of ``adata`` in order of appearance; a missing field raises."""
    import pandas as pd

    if keys.SLIDE_ID not in adata.obs:
        raise GnnstError(f"predictions lack obs['{keys.SLIDE_ID}']: not a gnnst prediction AnnData")
    if keys.SPATIAL not in adata.obsm:
        raise GnnstError(f"predictions lack obsm['{keys.SPATIAL}'] (full-resolution pixels)")
    if adata.n_obs == 0:
        raise GnnstError("predictions have no spots")
    return [str(s) for s in pd.unique(adata.obs[keys.SLIDE_ID].astype(str))]


def _element_name(slide_id: str) -> str:
    """``slide_id`` with every character spatialdata does not allow in a name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", slide_id).lstrip(".") or "slide"


def _slide_meta(adata: "AnnData", slide_id: str) -> dict:
    """``uns['gnnst']`` of one slide (``uns['gnnst']['slides'][slide]`` after ``concat_slides``)."""
    meta = dict(adata.uns.get(keys.UNS_GNNST, {}))
    per_slide = meta.get("slides")
    if isinstance(per_slide, dict) and slide_id in per_slide:
        meta = dict(per_slide[slide_id])
    return meta


def _spot_shapes(xy: np.ndarray, adata: "AnnData", slide_id: str, meta: dict, *, cs: str,
                 spot_diameter_um: float | None, prefix: str):
    """``(name, shapes element)``: grid cells as polygons, else spots as circles, in full-resolution px."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    grid = meta.get("grid")
    if isinstance(grid, dict) and grid.get("kind") is not None:
        corners = cell_polygon(float(grid["pitch_px"]), kind=str(grid["kind"]))  # [K, 2]
        polys = shapely.polygons(xy[:, None, :] + corners[None])  # one cell per spot
        gdf = gpd.GeoDataFrame(geometry=polys, index=pd.RangeIndex(len(xy)))
        return f"{prefix}_grid", ShapesModel.parse(gdf, transformations={cs: Identity()})
    diameter = _spot_diameter_px(xy, adata, slide_id, meta, spot_diameter_um)
    return f"{prefix}_spots", ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), diameter / 2.0),
                                                index=pd.RangeIndex(len(xy)), transformations={cs: Identity()})


def cell_polygon(pitch_px: float, *, kind: str) -> np.ndarray:
    """Corners ``[K, 2]`` (pixels, around the origin) of one cell of a :mod:`gnnst.data.grid` grid.

    ``"square"``: the ``pitch`` x ``pitch`` square. ``"hex"``: rows ``pitch * sqrt(3)/2`` apart with odd
    rows shifted by ``pitch/2`` tile the plane with pointy-top hexagons of circumradius
    ``pitch / sqrt(3)`` (width ``pitch``), corners at 30°, 90°, ..., 330°.
    """
    if kind == "square":
        h = pitch_px / 2.0
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if kind == "hex":
        angles = np.deg2rad(30.0 + 60.0 * np.arange(6))
        return pitch_px / np.sqrt(3.0) * np.c_[np.cos(angles), np.sin(angles)]
    raise GnnstError(f"uns['gnnst']['grid']['kind'] must be 'hex' or 'square', got {kind!r}")


def _spot_diameter_px(xy: np.ndarray, adata: "AnnData", slide_id: str, meta: dict,
                      spot_diameter_um: float | None) -> float:
    from gnnst.predictions import _pitch_px

    if spot_diameter_um is not None:
        mpp = meta.get(keys.MPP)
        if mpp is None:
            raise GnnstError(f"slide '{slide_id}': a spot diameter in µm needs uns['gnnst']['mpp'], which is missing")
        return float(spot_diameter_um) / float(mpp)
    lib = adata.uns.get(keys.SPATIAL, {}).get(slide_id, {})
    value = lib.get(keys.SCALEFACTORS, {}).get(keys.SPOT_DIAMETER)
    return float(value) if value is not None else 0.5 * _pitch_px(xy)


def _image_element(adata: "AnnData", slide_id: str, meta: dict, image: str | Path | None, *, cs: str,
                   max_side: int):
    """The slide's H&E thumbnail as an image element scaled onto full-resolution pixels."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    lib = adata.uns.get(keys.SPATIAL, {}).get(slide_id, {})
    if image is None and keys.HIRES in lib.get(keys.IMAGES, {}):
        thumb = np.asarray(lib[keys.IMAGES][keys.HIRES])
        scalef = float(lib[keys.SCALEFACTORS][keys.HIRES_SCALEF])  # thumbnail px per full-resolution px
    else:
        path = image if image is not None else meta.get(keys.IMAGE_PATH)
        if not path:
            raise GnnstError(f"slide '{slide_id}': no image to store (no uns['spatial']['{slide_id}'] thumbnail and "
                             f"no uns['gnnst']['image_path']); give the image, or write without one")
        thumb, scalef = _thumbnail(path, max_side=max_side,
                                   image_scalef=1.0 if image is not None else float(meta.get(keys.IMAGE_SCALEF, 1.0)))
    if thumb.ndim != 3 or thumb.shape[2] < 3:
        raise GnnstError(f"slide '{slide_id}': the image must be RGB [h, w, 3], got shape {thumb.shape}")
    if thumb.dtype != np.uint8:
        thumb = (np.clip(thumb, 0, 1) * 255).round().astype(np.uint8) if thumb.dtype.kind == "f" else \
            thumb.astype(np.uint8)
    cyx = np.ascontiguousarray(thumb[..., :3].transpose(2, 0, 1))  # [3, h, w]
    return Image2DModel.parse(cyx, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                              transformations={cs: Scale([1.0 / scalef, 1.0 / scalef], axes=("x", "y"))})


def _thumbnail(path: str | Path, *, max_side: int, image_scalef: float) -> tuple[np.ndarray, float]:
    """``(thumbnail [h, w, 3] uint8, its pixels per full-resolution pixel)`` of the image at ``path``,
    whose own pixels are ``image_scalef`` per full-resolution pixel."""
    from gnnst.data.images import open_image

    if not Path(path).exists():
        raise GnnstError(f"image not found: {path}; give the slide's image, or write without one")
    with open_image(path) as im:
        thumb = np.ascontiguousarray(im.thumbnail(max_side), dtype=np.uint8)
        return thumb, thumb.shape[1] / im.width * float(image_scalef)
