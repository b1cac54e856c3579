"""10x Genomics Space Ranger ``outs/`` directories (Visium, Visium HD bins) to canonical AnnData."""

from __future__ import annotations

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
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
GENE_EXPRESSION = "Gene Expression"  # the feature type kept; antibody/CRISPR features are dropped


def read_spaceranger(
    outs: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str,
    mpp: float | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    in_tissue_only: bool = True,
) -> "AnnData":
    """Read one Space Ranger ``outs/`` directory.

    Args:
        outs: the ``outs/`` directory (for Visium HD, one ``binned_outputs/square_XXXum/`` directory).
            Counts come from ``filtered_feature_bc_matrix.h5`` or, if absent, the
            ``filtered_feature_bc_matrix/`` folder (``matrix.mtx.gz``, ``barcodes.tsv.gz``,
            ``features.tsv.gz``); only ``Gene Expression`` features are kept. Positions come from
            ``spatial/tissue_positions.parquet``, ``spatial/tissue_positions.csv`` (with header) or
            ``spatial/tissue_positions_list.csv`` (no header), the first that exists.
        image: the full-resolution H&E image the ``pxl_*_in_fullres`` coordinates refer to (it is not
            part of ``outs/``). Only its path is recorded.
        slide_id: written to ``obs['slide_id']``.
        mpp: micrometres per full-resolution pixel; when ``None`` it is read from
            ``spatial/scalefactors_json.json``: ``microns_per_pixel`` if present (Visium HD), else
            ``spot_diameter_um / spot_diameter_fullres``; ``None`` if that file is absent.
        spot_diameter_um: physical spot diameter matching ``spot_diameter_fullres``.
        in_tissue_only: keep only spots with ``in_tissue == 1``; when ``False`` every barcode of the
            filtered matrix is kept.

    Every matrix barcode must have a row in the positions file (else an error naming the barcode
    and both files). ``obsm['spatial']`` is ``(pxl_col_in_fullres, pxl_row_in_fullres)``, i.e. (x, y).
    Sets, besides the canonical fields of :mod:`gnnst.data.validate`: ``obs['in_tissue']``,
    ``obs['array_row']``, ``obs['array_col']``, ``var['gene_ids']``, ``var['feature_types']``.
    """
    import anndata as ad
    import pandas as pd

    from gnnst.data.validate import canonicalise

    outs = Path(outs)
    if not outs.is_dir():
        what = "is a file, not the outs directory" if outs.exists() else "outs directory not found"
        raise GnnstError(f"Space Ranger {what}: {outs}")
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

    positions_file = _find_positions(outs)
    pos = _read_positions(positions_file)
    unjoined = ~barcodes.isin(pos.index)
    if unjoined.any():
        raise GnnstError(
            f"{matrix_file}: barcode '{barcodes[unjoined][0]}' has no row in the positions file "
            f"{positions_file} ({int(unjoined.sum())} of {len(barcodes)} barcodes unmatched)"
        )
    if barcodes.duplicated().any():
        raise GnnstError(f"{matrix_file}: duplicate spot barcode '{barcodes[barcodes.duplicated()][0]}'")
    sel = pos.loc[barcodes]
    keep = (sel["in_tissue"] == 1).to_numpy() if in_tissue_only else np.ones(len(sel), dtype=bool)
    sel = sel[keep]

    var.index = ad.utils.make_index_unique(var.index.astype(str))  # as canonicalise would, without a warning
    adata = ad.AnnData(X=X[np.flatnonzero(keep)],
                       obs=pd.DataFrame(index=pd.Index(sel.index, name=keys.BARCODE)), var=var)
    adata.obsm[keys.SPATIAL] = sel[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)  # (x, y)
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = sel[col].to_numpy()
    if mpp is None:
        mpp = _mpp_from_scalefactors(outs / SCALEFACTORS, spot_diameter_um)
    return canonicalise(adata, slide_id=slide_id, source="spaceranger", file=str(matrix_file), mpp=mpp,
                        image_path=None if image is None else str(image))


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


def _mpp_from_scalefactors(path: Path, spot_diameter_um: float) -> float | None:
    """Micrometres per full-resolution pixel from ``scalefactors_json.json``, or ``None`` if absent."""
    import json

    if not path.is_file():
        return None
    try:
        factors = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GnnstError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(factors, dict):
        raise GnnstError(f"{path}: expected a JSON object of scale factors, got {type(factors).__name__}")
    key, value = "microns_per_pixel", factors.get("microns_per_pixel")
    if value is None:
        key, value = "spot_diameter_fullres", factors.get("spot_diameter_fullres")
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise GnnstError(f"{path}: '{key}' must be a positive number, got {factors[key]!r}")
    return value if key == "microns_per_pixel" else float(spot_diameter_um) / value


def _read_tsv(path: Path) -> "pd.DataFrame":
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str)
    except Exception as e:  # pandas/gzip raise many types for corrupt input
        raise GnnstError(f"{path}: cannot be read as a tab-separated table ({type(e).__name__}: {e})") from None


def _decode(values: np.ndarray) -> np.ndarray:
    """HDF5 byte strings to ``str``."""
    return np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values.astype(str)
