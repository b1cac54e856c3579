"""10x Genomics Space Ranger ``outs/`` directories (Visium, Visium HD bins) to canonical AnnData."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp
    from anndata import AnnData

VISIUM_SPOT_DIAMETER_UM = 55.0  # diameter of one Visium (v1/v2) capture spot
MATRIX_H5 = "filtered_feature_bc_matrix.h5"
MATRIX_DIR = "filtered_feature_bc_matrix"
SCALEFACTORS = "spatial/scalefactors_json.json"
# searched in this order; the list file is the headerless Space Ranger 1.x layout
POSITION_FILES = ("spatial/tissue_positions.parquet", "spatial/tissue_positions.csv",
                  "spatial/tissue_positions_list.csv")
IMAGES = {"hires": "spatial/tissue_hires_image.png", "lowres": "spatial/tissue_lowres_image.png"}  # in this order
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
GENE_EXPRESSION = "Gene Expression"  # the feature type kept; antibody/CRISPR features are dropped

log = logging.getLogger("gnnst")


def read_spaceranger(
    outs: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str,
    mpp: float | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    in_tissue_only: bool = True,
    unmatched: str = "error",
) -> "AnnData":
    """Read one Space Ranger ``outs/`` directory.

    Args:
        outs: the ``outs/`` directory (for Visium HD, one ``binned_outputs/square_XXXum/`` directory);
            the ``filtered_feature_bc_matrix.h5`` inside it is taken to mean its folder.
            Counts come from ``filtered_feature_bc_matrix.h5`` or, if absent, the
            ``filtered_feature_bc_matrix/`` folder (``matrix.mtx.gz``, ``barcodes.tsv.gz``,
            ``features.tsv.gz``); only ``Gene Expression`` features are kept. Positions come from
            ``spatial/tissue_positions.parquet``, ``spatial/tissue_positions.csv`` (with header) or
            ``spatial/tissue_positions_list.csv`` (no header), the first that exists.
        image: the full-resolution H&E image the ``pxl_*_in_fullres`` coordinates refer to (it is not
            part of ``outs/``). When ``None``, ``spatial/tissue_hires_image.png`` (else
            ``tissue_lowres_image.png``) is used with its scale factor from
            ``scalefactors_json.json`` (``uns['gnnst']['image_scalef']``; its µm per pixel is
            ``mpp / scalef``); the log says which. Only the image's path is recorded.
        slide_id: written to ``obs['slide_id']``.
        mpp: micrometres per full-resolution pixel; when ``None`` it is read from
            ``spatial/scalefactors_json.json``: ``microns_per_pixel`` if present (Visium HD), else
            ``spot_diameter_um / spot_diameter_fullres``; ``None`` if that file is absent.
        spot_diameter_um: physical spot diameter matching ``spot_diameter_fullres``.
        in_tissue_only: keep only spots with ``in_tissue == 1``; when ``False`` every barcode of the
            filtered matrix is kept.
        unmatched: a matrix barcode without a row in the positions file is an ``"error"`` (the
            default, naming the barcode and both files), or ``"drop"``: dropped and counted in the log.

    ``obsm['spatial']`` is ``(pxl_col_in_fullres, pxl_row_in_fullres)``, i.e. (x, y), in full-resolution
    pixels whichever image is used. In-tissue spots without counts are counted in the log. Duplicate
    gene symbols are kept apart and made unique (see :mod:`gnnst.data.validate`).
    Sets, besides the canonical fields of :mod:`gnnst.data.validate`: ``obs['in_tissue']``,
    ``obs['array_row']``, ``obs['array_col']``, ``var['gene_ids']``, ``var['feature_types']``.
    """
    import anndata as ad
    import pandas as pd

    from gnnst.data.readers import check_choice
    from gnnst.data.validate import canonicalise, duplicate_names_quiet

    check_choice("unmatched", unmatched)
    outs = outs_folder(outs)
    h5 = outs / MATRIX_H5
    if h5.is_file():
        matrix_file = h5
        X, barcodes, var = _read_matrix_h5(h5)
    else:
        matrix_file = outs / MATRIX_DIR
        X, barcodes, var = _read_matrix_mtx(matrix_file)
    if "feature_types" in var.columns and (var["feature_types"] == GENE_EXPRESSION).any():
        gex = (var["feature_types"] == GENE_EXPRESSION).to_numpy()
        X, var = X[:, gex], var[gex].copy()
    if barcodes.duplicated().any():
        raise GnnstError(f"{matrix_file}: duplicate spot barcode '{barcodes[barcodes.duplicated()][0]}'")

    positions_file = _find_positions(outs)
    pos = _read_positions(positions_file)
    unjoined = ~barcodes.isin(pos.index)
    if unjoined.any() and unmatched == "error":
        raise GnnstError(
            f"{matrix_file}: barcode '{barcodes[unjoined][0]}' has no row in the positions file "
            f"{positions_file} ({int(unjoined.sum())} of {len(barcodes)} barcodes unmatched; "
            f"reader_options: {{unmatched: drop}} drops them)"
        )
    if unjoined.any():
        log.info("slide %s: dropped %d of %d matrix barcodes of %s without a row in %s (unmatched: drop), e.g. '%s'",
                 slide_id, int(unjoined.sum()), len(barcodes), matrix_file.name, positions_file.name,
                 barcodes[unjoined][0])
        X, barcodes = X[np.flatnonzero(~unjoined)], barcodes[~unjoined]
    sel = pos.loc[barcodes]
    if in_tissue_only:
        keep = (sel["in_tissue"] == 1).to_numpy()
        if not keep.any():
            raise GnnstError(f"{positions_file}: no spots under tissue in slide '{slide_id}': no barcode of "
                             f"{matrix_file.name} has 1 in column 'in_tissue'")
        no_counts = int((pos["in_tissue"] == 1).sum()) - int(keep.sum())
        if no_counts:
            log.info("slide %s: %d in-tissue spots of %s have no counts in %s and are dropped", slide_id,
                     no_counts, positions_file.name, matrix_file.name)
    else:
        keep = np.ones(len(sel), dtype=bool)
    sel = sel[keep]

    with duplicate_names_quiet():  # duplicate gene names are made unique, with a warning, by canonicalise
        adata = ad.AnnData(X=X[np.flatnonzero(keep)],
                           obs=pd.DataFrame(index=pd.Index(sel.index, name=keys.BARCODE)), var=var)
    adata.obsm[keys.SPATIAL] = sel[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)  # (x, y)
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = sel[col].to_numpy()
    factors = _read_scalefactors(outs / SCALEFACTORS)
    if mpp is None:
        mpp = _mpp_from_scalefactors(factors, outs / SCALEFACTORS, spot_diameter_um)
    scalef = 1.0
    if image is None:
        image, scalef = _downscaled_image(outs, factors, slide_id=slide_id, mpp=mpp)
    return canonicalise(adata, slide_id=slide_id, source="spaceranger", file=str(matrix_file), mpp=mpp,
                        image_path=None if image is None else str(image), image_scalef=scalef)


def outs_folder(outs: str | Path) -> Path:
    """The ``outs/`` folder named by ``outs``: the folder itself, or the folder of the
    ``filtered_feature_bc_matrix.h5`` (or ``raw_feature_bc_matrix.h5``) inside it."""
    outs = Path(outs)
    if outs.is_dir():
        return outs
    if outs.is_file() and outs.suffix == ".h5" and (outs.parent / "spatial").is_dir():
        if outs.name != MATRIX_H5:
            raise GnnstError(f"{outs}: gnnst reads {MATRIX_H5} from the outs folder; name the folder "
                             f"'{outs.parent}' as the 'outs' file role")
        return outs.parent
    if outs.exists():
        raise GnnstError(f"Space Ranger 'outs' must be the outs/ folder (holding {MATRIX_H5} and spatial/), "
                         f"got the file {outs}; name its folder instead")
    raise GnnstError(f"Space Ranger outs directory not found: {outs}")


def folder_files(outs: Path) -> list[Path]:
    """The files :func:`read_spaceranger` may read from ``outs`` (those present), for its checksum."""
    outs = outs_folder(outs)
    found = [outs / MATRIX_H5] if (outs / MATRIX_H5).is_file() else \
        sorted(p for p in (outs / MATRIX_DIR).glob("*") if p.is_file())
    found += [outs / n for n in (*POSITION_FILES, SCALEFACTORS, *IMAGES.values())
              if (outs / n).is_file()]
    return found


def _downscaled_image(outs: Path, factors: dict | None, *, slide_id: str, mpp: float | None
                      ) -> tuple[Path | None, float]:
    """The hires (else lowres) PNG of ``outs/spatial`` and its pixels per full-resolution pixel, or
    ``(None, 1.0)`` when there is neither."""
    for res, name in IMAGES.items():
        path = outs / name
        if not path.is_file():
            continue
        key = f"tissue_{res}_scalef"
        value = None if factors is None else factors.get(key)
        if value is None:
            raise GnnstError(f"{outs / SCALEFACTORS}: needs '{key}' to use {path} (no full-resolution image given)"
                             if factors is not None else
                             f"{outs / SCALEFACTORS} not found: it holds the scale of {path}, which is used "
                             f"because no full-resolution image is given")
        scalef = _positive_factor(value, outs / SCALEFACTORS, key)
        log.info("slide %s: no full-resolution image given; using the %s image %s (%s %.6g image px per "
                 "full-resolution px%s)", slide_id, res, path, key, scalef,
                 "" if mpp is None else f", {mpp / scalef:.4g} µm/px")
        return path, scalef
    return None, 1.0


def _read_matrix_h5(path: Path) -> tuple["sp.csr_matrix", "pd.Index", "pd.DataFrame"]:
    """Counts ``[N, G]`` (CSR), barcodes and features of a 10x feature-barcode HDF5 file."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise GnnstError(f"{path}: not a 10x feature-barcode matrix (no 'matrix' group)")
            m = f["matrix"]
            for k in ("data", "indices", "indptr", "shape", "barcodes", "features/id", "features/name"):
                if k not in m:
                    raise GnnstError(f"{path}: 10x matrix lacks dataset 'matrix/{k}'")
            n_genes, n_spots = (int(v) for v in m["shape"][:2])  # stored features x barcodes (CSC)
            data = m["data"][:].astype(np.float32)
            X = sp.csr_matrix((data, m["indices"][:], m["indptr"][:]), shape=(n_spots, n_genes))  # [N, G]
            barcodes = pd.Index(_decode(m["barcodes"][:]))
            var = pd.DataFrame({"gene_ids": _decode(m["features/id"][:])}, index=_decode(m["features/name"][:]))
            if "features/feature_type" in m:
                var["feature_types"] = _decode(m["features/feature_type"][:])
    except GnnstError:
        raise
    except Exception as e:  # h5py/scipy raise many types for corrupt or inconsistent input
        raise GnnstError(f"{path}: cannot be read as a 10x feature-barcode HDF5 ({type(e).__name__}: {e})") from None
    return X, barcodes, _check_shapes(path, X, barcodes, var)


def _read_matrix_mtx(folder: Path) -> tuple["sp.csr_matrix", "pd.Index", "pd.DataFrame"]:
    """Counts ``[N, G]`` (CSR), barcodes and features of a 10x Matrix Market folder."""
    import pandas as pd
    import scipy.io
    import scipy.sparse as sp

    if not folder.is_dir():
        raise GnnstError(f"no counts in {folder.parent}: neither {MATRIX_H5} nor {MATRIX_DIR}/ exists")
    files = {}
    for stem in ("matrix.mtx", "barcodes.tsv", "features.tsv"):
        found = [folder / n for n in (stem + ".gz", stem) if (folder / n).is_file()]
        if not found:
            raise GnnstError(f"file not found: {folder / (stem + '.gz')}")
        files[stem] = found[0]
    try:
        X = sp.csr_matrix(scipy.io.mmread(files["matrix.mtx"]).T, dtype=np.float32)  # [N, G]
    except Exception as e:  # scipy/gzip raise many types for corrupt input
        raise GnnstError(f"{files['matrix.mtx']}: cannot be read as Matrix Market ({type(e).__name__}: {e})") from None
    barcodes = pd.Index(_read_tsv(files["barcodes.tsv"])[0].astype(str))
    feats = _read_tsv(files["features.tsv"])
    if feats.shape[1] < 2:
        raise GnnstError(f"{files['features.tsv']}: needs columns id, name[, feature_type], got {feats.shape[1]}")
    var = pd.DataFrame({"gene_ids": feats[0].astype(str).to_numpy()}, index=feats[1].astype(str).to_numpy())
    if feats.shape[1] >= 3:
        var["feature_types"] = feats[2].astype(str).to_numpy()
    return X, barcodes, _check_shapes(files["matrix.mtx"], X, barcodes, var)


def _check_shapes(path: Path, X, barcodes, var):
    if X.shape != (len(barcodes), len(var)):
        raise GnnstError(
            f"{path}: matrix is {X.shape[1]} features x {X.shape[0]} barcodes but lists "
            f"{len(var)} features and {len(barcodes)} barcodes"
        )
    var.index = var.index.astype(str)
    return var


def _find_positions(outs: Path) -> Path:
    for name in POSITION_FILES:
        if (outs / name).is_file():
            return outs / name
    raise GnnstError(f"no spot positions in {outs}: none of {', '.join(POSITION_FILES)} exists")


def _read_positions(path: Path) -> "pd.DataFrame":
    """The positions table indexed by barcode, with the columns of :data:`POSITION_COLUMNS`."""
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            if "barcode" not in table.columns and table.index.name == "barcode":
                table = table.reset_index()
        else:
            with open(path) as f:
                has_header = f.readline().split(",")[0].strip().strip('"') == "barcode"
            table = pd.read_csv(path, header=0 if has_header else None,
                                names=None if has_header else list(POSITION_COLUMNS))
    except Exception as e:  # pandas/pyarrow raise many types for corrupt input
        raise GnnstError(f"{path}: cannot be read as a tissue positions table ({type(e).__name__}: {e})") from None
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise GnnstError(f"{path}: positions table lacks column '{missing[0]}' (needs {', '.join(POSITION_COLUMNS)})")
    table = table.set_index(table["barcode"].astype(str))
    if table.index.duplicated().any():
        raise GnnstError(f"{path}: duplicate barcode '{table.index[table.index.duplicated()][0]}'")
    for col in POSITION_COLUMNS[1:]:
        try:
            table[col] = pd.to_numeric(table[col])
        except (ValueError, TypeError):
            bad = table.index[pd.to_numeric(table[col], errors="coerce").isna() & table[col].notna()][0]
            raise GnnstError(f"{path}: column '{col}' is not numeric at barcode '{bad}'") from None
    return table


def _read_scalefactors(path: Path) -> dict | None:
    """``scalefactors_json.json`` as a dict, or ``None`` if absent."""
    import json

    if not path.is_file():
        return None
    try:
        factors = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GnnstError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(factors, dict):
        raise GnnstError(f"{path}: expected a JSON object of scale factors, got {type(factors).__name__}")
    return factors


def _mpp_from_scalefactors(factors: dict | None, path: Path, spot_diameter_um: float) -> float | None:
    """Micrometres per full-resolution pixel from the scale factors read from ``path``, or ``None``."""
    if factors is None:
        return None
    key, value = "microns_per_pixel", factors.get("microns_per_pixel")
    if value is None:
        key, value = "spot_diameter_fullres", factors.get("spot_diameter_fullres")
    if value is None:
        return None
    value = _positive_factor(value, path, key)
    return value if key == "microns_per_pixel" else float(spot_diameter_um) / value


def _positive_factor(value, path: Path, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (np.isfinite(v) and v > 0):
        raise GnnstError(f"{path}: '{key}' must be a positive number, got {value!r}")
    return v


def _read_tsv(path: Path) -> "pd.DataFrame":
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str)
    except Exception as e:  # pandas/gzip raise many types for corrupt input
        raise GnnstError(f"{path}: cannot be read as a tab-separated table ({type(e).__name__}: {e})") from None


def _decode(values: np.ndarray) -> np.ndarray:
    """HDF5 byte strings to ``str``."""
    return np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values.astype(str)
