"""A slide stored as a SpatialData zarr store (scverse's spatial format) to canonical AnnData.

What is taken from the store:

- the **table** (``tables/<name>``) with the counts: ``X``, or ``layers[counts_layer]``; its rows are
  the spots (``obs_names`` the barcodes) and its ``uns['spatialdata_attrs']`` names the element it
  annotates (``region``), the ``obs`` column saying which (``region_key``) and the ``obs`` column
  holding each row's instance id in that element (``instance_key``);
- the **spots**: the annotated element, a shapes element of circles (points with a ``radius``) or of
  polygons (their centroids), or a points element (its ``x``, ``y``), matched to the table rows by
  instance id (the element's index);
- the **H&E**: an image element (``images/<name>``, axes ``c, y, x``, 8-bit RGB); of a multiscale
  image the full resolution (``scale0``). Patches are cut from it lazily (:mod:`gnnst.data.zarr_image`):
  ``uns['gnnst']['image_path']`` is the element's folder ``<store>/images/<name>``.

Coordinates: the spots and the image must both have a transformation to one coordinate system (the
option ``coordinate_system``, else ``global`` when both have it, else the one they share). The spot
centres are mapped through the spots' transformation to it and back through the inverse of the
image's, so ``obsm['spatial']`` holds pixels of the image's full resolution (spatialdata's continuous
pixel coordinates: pixel ``j`` spans ``[j, j + 1)``). Every spatialdata transformation (identity,
scale, translation, affine, axis map, and sequences of these) is affine in x, y and is supported; an
image transformation that cannot be inverted, or one involving another axis, is an error naming the
element and the store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger("gnnst")

DEFAULT_COORDINATE_SYSTEM = "global"  # spatialdata's default name
NEIGHBOUR_SHELL = 1.3  # neighbours for the spot pitch: closer than this x the median nearest-neighbour distance
ELEMENT_GROUPS = ("images", "shapes", "points", "tables")  # read from the store (labels are not used)


def read_spatialdata(
    zarr: str | Path,
    *,
    slide_id: str,
    mpp: float | None = None,
    pitch_um: float | None = None,
    image_element: str | None = None,
    table_element: str | None = None,
    region: str | None = None,
    counts_layer: str | None = None,
    coordinate_system: str | None = None,
    unmatched: str = "error",
) -> "AnnData":
    """Read one slide from a SpatialData zarr store (see the module docstring for what is taken).

    Args:
        zarr: the store, a ``.zarr`` folder written by ``SpatialData.write`` (e.g. by spatialdata-io).
        slide_id: written to ``obs['slide_id']``.
        mpp: micrometres per pixel of the image element's full resolution (manifest ``scale.mpp``).
        pitch_um: centre-to-centre distance of neighbouring spots in µm (manifest ``scale.pitch_um``;
            Visium 100, legacy ST 200): when ``mpp`` is not given, ``mpp = pitch_um /`` the median
            distance in image pixels between neighbouring spots (:func:`_mpp_from_pitch`). Neither
            given: ``mpp`` stays unknown (SpatialData stores no physical pixel size).
        image_element: the image element to cut patches from; default: the only one, or of several
            the largest (the log names it and the others).
        table_element: the table with the counts; default: the only table.
        region: the annotated element holding the spots, when the table annotates several.
        counts_layer: ``layers`` key of the raw counts; ``None`` takes ``X``. They must be whole numbers.
        coordinate_system: the coordinate system relating spots and image (see the module docstring).
        unmatched: a table row whose instance id the spots element lacks is an ``"error"`` (default),
            or ``"drop"``: dropped and counted in the log.

    Keeps the table's ``obs`` columns. Returns the canonical AnnData of :mod:`gnnst.data.validate`.
    """
    import anndata as ad
    import pandas as pd

    from gnnst.data.readers import check_choice
    from gnnst.data.validate import canonicalise, duplicate_names_quiet

    check_choice("unmatched", unmatched)
    store = Path(zarr)
    sdata = _read_store(store)
    tname, table = _pick(sdata.tables, table_element, kind="table", option="table_element", store=store)
    region, region_key, instance_key = _annotation(table, tname, region, store)
    rows = (table.obs[region_key].astype(str) == region).to_numpy() if region_key in table.obs else \
        np.ones(table.n_obs, dtype=bool)
    if instance_key not in table.obs:
        raise GnnstError(f"{store}: table '{tname}' lacks its instance_key column obs['{instance_key}']")
    ids = table.obs[instance_key].to_numpy()[rows]
    element, centres = _spot_centres(sdata, region, store)  # [M, 2] element coordinates, indexed by instance id
    if not centres.index.is_unique:
        dup = centres.index[centres.index.duplicated()][0]
        raise GnnstError(f"{store}: element '{region}' has instance id {np.asarray(dup).item()!r} twice; the table's "
                         f"rows cannot be matched to its spots")
    found = pd.Index(centres.index).get_indexer(ids)
    missing = found < 0
    barcodes = table.obs_names[rows]
    if missing.any() and unmatched == "error":
        first = np.asarray(ids[missing][0]).item()
        raise GnnstError(f"{store}: table '{tname}' row '{barcodes[missing][0]}' has {instance_key} {first!r}, "
                         f"which element '{region}' lacks ({int(missing.sum())} of {len(ids)} rows unmatched; "
                         f"reader_options: {{unmatched: drop}} drops them)")
    if missing.any():
        log.info("slide %s: dropped %d of %d rows of table '%s' whose %s is not in element '%s' (unmatched: drop)",
                 slide_id, int(missing.sum()), len(ids), tname, instance_key, region)
    keep = np.flatnonzero(rows)[~missing]
    xy = centres.to_numpy(np.float64)[found[~missing]]  # [N, 2] element coordinates

    iname, image = _pick_image(sdata, image_element, store)
    image_path = None
    if image is not None:
        cs = _coordinate_system(element, region, image, iname, coordinate_system, store)
        xy = _to_image_pixels(xy, element, region, image, iname, cs, store)
        image_path = store / "images" / iname
        log.info("slide %s: spots of '%s', counts of table '%s', image '%s', via coordinate system '%s'",
                 slide_id, region, tname, iname, cs)
    X = _counts(table, counts_layer, tname, store)[keep]
    with duplicate_names_quiet():
        adata = ad.AnnData(X=X, obs=table.obs.iloc[keep].copy(), var=table.var.copy())
    adata.obs_names = pd.Index(np.asarray(barcodes)[~missing].astype(str), name=keys.BARCODE)
    adata.obsm[keys.SPATIAL] = xy
    if mpp is None and pitch_um is not None:
        mpp = _mpp_from_pitch(xy, pitch_um, store=store, slide_id=slide_id)
    return canonicalise(adata, slide_id=slide_id, source="spatialdata", file=str(store), mpp=mpp,
                        image_path=None if image_path is None else str(image_path))


def folder_files(store: Path) -> list[Path]:
    """Every file of the store (the reader may read any element), for the folder's checksum."""
    store = Path(store)
    if not store.is_dir():
        raise GnnstError(f"SpatialData store not found: {store}")
    return sorted(p for p in store.rglob("*") if p.is_file())


def _read_store(store: Path):
    import spatialdata

    if not store.is_dir():
        raise GnnstError(f"SpatialData store not found: {store} (a .zarr folder)")
    try:
        return spatialdata.read_zarr(store, selection=ELEMENT_GROUPS)
    except Exception as e:  # zarr/spatialdata raise many types for a damaged or foreign store
        raise GnnstError(f"{store}: cannot be read as a SpatialData store ({type(e).__name__}: {e})") from None


def _pick(elements, name: str | None, *, kind: str, option: str, store: Path):
    """``(name, element)``: the one named, or the only one."""
    names = list(elements)
    if name is not None:
        if name not in elements:
            raise GnnstError(f"{store}: no {kind} element '{name}' ({option}); {kind}s: {', '.join(names) or 'none'}")
        return name, elements[name]
    if not names:
        raise GnnstError(f"{store}: has no {kind} element")
    if len(names) > 1:
        raise GnnstError(f"{store}: has {len(names)} {kind} elements ({', '.join(names)}); name one with "
                         f"reader_options: {{{option}: ...}}")
    return names[0], elements[names[0]]


def _annotation(table, tname: str, region: str | None, store: Path) -> tuple[str, str, str]:
    """``(region, region_key, instance_key)`` of the table's ``uns['spatialdata_attrs']``."""
    attrs = table.uns.get("spatialdata_attrs") or {}
    regions, region_key, instance_key = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    if regions is None or instance_key is None:
        raise GnnstError(f"{store}: table '{tname}' annotates no element (uns['spatialdata_attrs'] lacks "
                         f"'region' or 'instance_key'); gnnst needs the spots it annotates")
    regions = [regions] if isinstance(regions, str) else [str(r) for r in regions]
    if region is not None:
        if region not in regions:
            raise GnnstError(f"{store}: table '{tname}' does not annotate '{region}' (region); it annotates "
                             f"{', '.join(regions)}")
        return region, str(region_key), str(instance_key)
    if len(regions) > 1:
        raise GnnstError(f"{store}: table '{tname}' annotates {len(regions)} elements ({', '.join(regions)}); name "
                         f"the one with the spots with reader_options: {{region: ...}}")
    return regions[0], str(region_key), str(instance_key)


def _spot_centres(sdata, region: str, store: Path):
    """``(element, centres)``: the annotated element and its spot centres (a ``[M, 2]`` x, y frame
    indexed by instance id) in the element's own coordinates."""
    import pandas as pd

    if region in sdata.shapes:
        el = sdata.shapes[region]
        kinds = set(el.geometry.geom_type.unique())
        if kinds <= {"Point"}:
            xy = np.c_[el.geometry.x.to_numpy(), el.geometry.y.to_numpy()]
        elif kinds <= {"Polygon", "MultiPolygon"}:
            c = el.geometry.centroid
            xy = np.c_[c.x.to_numpy(), c.y.to_numpy()]
        else:
            raise GnnstError(f"{store}: shapes element '{region}' holds {', '.join(sorted(kinds))} geometries; "
                             f"gnnst reads spots as circles, polygons or points")
        return el, pd.DataFrame(xy, index=el.index, columns=["x", "y"])
    if region in sdata.points:
        el = sdata.points[region]
        df = el[["x", "y"]].compute()
        return el, df
    where = "a labels element" if region in getattr(sdata, "labels", {}) else "not a shapes or points element"
    raise GnnstError(f"{store}: the table annotates '{region}', {where} of the store; gnnst reads spots as "
                     f"circles, polygons or points")


def _pick_image(sdata, name: str | None, store: Path):
    """``(name, image)``: the image named, the only one, the largest of several, or ``(None, None)``."""
    names = list(sdata.images)
    if name is None and not names:
        return None, None
    if name is not None or len(names) == 1:
        return _pick(sdata.images, name, kind="image", option="image_element", store=store)

    def pixels(n: str) -> int:
        shape = _full_resolution(sdata.images[n]).shape
        return int(shape[-1]) * int(shape[-2])

    best = max(names, key=pixels)
    log.info("%s: %d image elements (%s); using the largest, '%s' (reader_options: {image_element: ...} "
             "chooses another)", store, len(names), ", ".join(names), best)
    return best, sdata.images[best]


def _full_resolution(image):
    """The full-resolution ``DataArray`` ``[c, y, x]`` of an image element (``scale0`` of a multiscale one)."""
    from xarray import DataTree

    if isinstance(image, DataTree):
        return next(iter(image["scale0"].ds.data_vars.values()))
    return image


def _transformations(element) -> dict:
    from spatialdata.transformations import get_transformation

    return get_transformation(element, get_all=True)


def _coordinate_system(element, ename: str, image, iname: str, chosen: str | None, store: Path) -> str:
    """The coordinate system both ``element`` and ``image`` have a transformation to."""
    own, theirs = _transformations(element), _transformations(image)
    shared = [cs for cs in own if cs in theirs]
    listing = (f"'{ename}' has {', '.join(own) or 'none'}; image '{iname}' has {', '.join(theirs) or 'none'}")
    if chosen is not None:
        if chosen not in shared:
            raise GnnstError(f"{store}: coordinate system '{chosen}' (coordinate_system) is not one both the spots "
                             f"and the image map to ({listing})")
        return chosen
    if not shared:
        raise GnnstError(f"{store}: the spots and the image share no coordinate system ({listing}); gnnst maps "
                         f"spots onto the image through one they both have a transformation to")
    return DEFAULT_COORDINATE_SYSTEM if DEFAULT_COORDINATE_SYSTEM in shared else shared[0]


def _affine(element, name: str, cs: str, store: Path) -> np.ndarray:
    """``[3, 3]`` matrix of ``element``'s transformation to ``cs`` on homogeneous (x, y, 1)."""
    from spatialdata.transformations import get_transformation

    try:
        m = get_transformation(element, to_coordinate_system=cs).to_affine_matrix(
            input_axes=("x", "y"), output_axes=("x", "y"))
    except Exception as e:  # a transformation spatialdata cannot express on x, y alone
        raise GnnstError(f"{store}: the transformation of element '{name}' to coordinate system '{cs}' is not an "
                         f"affine map of x, y ({type(e).__name__}: {e})") from None
    return np.asarray(m, dtype=np.float64)


def _to_image_pixels(xy: np.ndarray, element, ename: str, image, iname: str, cs: str, store: Path) -> np.ndarray:
    """Spot centres ``[N, 2]`` in ``element`` coordinates -> full-resolution pixels of ``image``."""
    to_cs = _affine(element, ename, cs, store)
    img_to_cs = _affine(image, iname, cs, store)
    if abs(np.linalg.det(img_to_cs[:2, :2])) < 1e-12:
        raise GnnstError(f"{store}: the transformation of image '{iname}' to coordinate system '{cs}' cannot be "
                         f"inverted; gnnst cannot place spots on that image")
    m = np.linalg.inv(img_to_cs) @ to_cs  # [3, 3] element -> image pixels
    return xy @ m[:2, :2].T + m[:2, 2]


def _counts(table, counts_layer: str | None, tname: str, store: Path):
    """The raw counts ``[N, G]`` of the table: ``X`` or ``layers[counts_layer]``, checked to be whole numbers."""
    from gnnst.data.readers.hest import _first_non_integer, _is_integer

    if counts_layer is None:
        if table.X is None:
            raise GnnstError(f"{store}: table '{tname}' has no X; give reader_options: {{counts_layer: ...}}")
        X, where = table.X, "X"
    elif counts_layer not in table.layers:
        raise GnnstError(f"{store}: table '{tname}' has no layers['{counts_layer}'] (counts_layer); layers: "
                         f"{', '.join(table.layers) or 'none'}")
    else:
        X, where = table.layers[counts_layer], f"layers['{counts_layer}']"
    if not _is_integer(X):
        raise GnnstError(f"{store}: table '{tname}' {where} is not raw counts (value {_first_non_integer(X)!r} is "
                         f"not a whole number); name the raw-count layer with reader_options: {{counts_layer: ...}}")
    return X


def _mpp_from_pitch(xy: np.ndarray, pitch_um: float, *, store: Path, slide_id: str) -> float:
    """``pitch_um`` over the spot pitch in pixels: the median distance between neighbouring spots ``[N, 2]``.

    Neighbours are the pairs closer than :data:`NEIGHBOUR_SHELL` times the median nearest-neighbour
    distance (the first shell of a square or hexagonal array, not its diagonals). The nearest-neighbour
    distance alone is biased short by the jitter of spot positions (her2st: 273 px against the 291 px
    of the array fit).
    """
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        raise GnnstError(f"{store}: slide '{slide_id}' has {len(xy)} spot(s); the spot pitch needs two or more: "
                         f"give 'scale: {{mpp: ...}}' in the manifest")
    tree = cKDTree(xy)
    nearest = float(np.median(tree.query(xy, k=2)[0][:, 1]))  # px
    if not nearest > 0:
        raise GnnstError(f"{store}: spots of slide '{slide_id}' coincide; cannot derive micrometres per pixel "
                         f"from the spot pitch: give 'scale: {{mpp: ...}}' in the manifest")
    pairs = tree.query_pairs(NEIGHBOUR_SHELL * nearest, output_type="ndarray")  # [P, 2]
    pitch_px = float(np.median(np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)))
    log.info("slide %s: spot pitch %.4g px = %g µm -> %.4g µm per pixel", slide_id, pitch_px, pitch_um,
             pitch_um / pitch_px)
    return float(pitch_um / pitch_px)
