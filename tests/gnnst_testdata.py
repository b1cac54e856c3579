"""Helpers for tests: tiny legacy-ST slides and manifests written by the tests; where the real data is."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HER2ST = Path(os.environ.get("GNNST_HER2ST", REPO.parent / "shared" / "data" / "her2st"))


def write_legacy_slide(root: Path, slide_id: str, *, grid=(4, 3), pitch_px=40.0, genes=12, seed=0,
                       image_size=(220, 180), extra_unselected=1) -> dict:
    """Write ``<id>.tsv.gz``, ``<id>_selection.tsv`` and ``<id>_HE.jpg`` in the her2st layout.

    Spots sit on a ``grid`` (nx, ny) of array coordinates starting at (2, 2), ``pitch_px`` apart;
    one extra unselected spot lies outside tissue. Returns the file names and the truth.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    nx, ny = grid
    rows, sel_lines = [], ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    ids = []
    for ax in range(2, 2 + nx):
        for ay in range(2, 2 + ny):
            px, py = 20.0 + (ax - 2) * pitch_px, 20.0 + (ay - 2) * pitch_px
            sel_lines.append(f"{ax}\t{ay}\t{ax:.3f}\t{ay:.3f}\t{px:.2f}\t{py:.2f}\t1")
            ids.append(f"{ax}x{ay}")
    for j in range(extra_unselected):
        sel_lines.append(f"{30 + j}\t30\t30\t30\t5.0\t5.0\t0")
    gene_names = [f"G{g}" for g in range(genes)]
    counts = rng.poisson(5.0, size=(len(ids), genes)).astype(int)
    counts[:, 0] += 20  # a highly expressed gene
    lines = ["\t" + "\t".join(gene_names)] + [f"{i}\t" + "\t".join(map(str, c)) for i, c in zip(ids, counts)]
    with gzip.open(root / f"{slide_id}.tsv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (root / f"{slide_id}_selection.tsv").write_text("\n".join(sel_lines) + "\n")
    img = (rng.random((image_size[1], image_size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(root / f"{slide_id}_HE.jpg", quality=90)
    return {"ids": ids, "counts": counts, "genes": gene_names, "pitch_px": pitch_px}


def write_manifest(path: Path, slides: dict[str, str], *, extra: str = "", sha: dict | None = None) -> Path:
    """A legacy-ST manifest for ``slides`` (slide id -> patient id); files relative to the data root."""
    lines = ["name: tiny", "reader: legacy_st", "scale: {pitch_um: 200}", "slides:"]
    for s, p in slides.items():
        lines += [f"  - slide_id: {s}", f"    patient_id: {p}", "    files:",
                  f"      counts: {{path: {s}.tsv.gz}}", f"      spots: {{path: {s}_selection.tsv}}",
                  f"      image: {{path: {s}_HE.jpg}}"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def write_spatialdata_store(path: Path, *, grid=(5, 4), pitch=10.0, origin=(5.0, 5.0), image_size=(128, 96),
                            spots_transform=None, image_transform=None, as_points=False, lowres=True,
                            chunks=32, genes=6, seed=0, image_name="he") -> dict:
    """Write a tiny SpatialData store at ``path``: image ``image_name`` (``image_size`` = (w, h), two scales,
    ``chunks`` px chunks; pixel (x, y) holds RGB ``(x % 256, y % 256, (x + y) % 256)``), optionally a
    quarter-size ``<image_name>_lowres`` with scale 4 to ``global``, spots on a ``grid`` (nx, ny) ``pitch`` apart
    from ``origin`` (element units) as circles ``spots`` (or points), and table ``table`` of Poisson
    counts annotating them, its rows in another order than the spots (instance ids 100, 101, ...).

    ``spots_transform``/``image_transform``: the elements' transformations to ``global`` (default
    identity). Returns ``{'barcodes', 'counts' [N, G], 'genes', 'xy' [N, 2] (element units, table order),
    'image' [h, w, 3]}``.
    """
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(seed)
    w, h = image_size
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)  # [h, w, 3]
    images = {image_name: Image2DModel.parse(image.transpose(2, 0, 1), dims=("c", "y", "x"), scale_factors=[2],
                                       chunks=(3, chunks, chunks),
                                       transformations={"global": image_transform or Identity()})}
    if lowres:
        lowres = image[::4, ::4].transpose(2, 0, 1).copy()  # [3, h/4, w/4]
        images[f"{image_name}_lowres"] = Image2DModel.parse(lowres, dims=("c", "y", "x"),
                                                 transformations={"global": Scale([4.0, 4.0], axes=("x", "y"))})
    nx, ny = grid
    xy = np.array([[origin[0] + i * pitch, origin[1] + j * pitch] for j in range(ny) for i in range(nx)])
    ids = 100 + np.arange(len(xy))
    tf = {"global": spots_transform or Identity()}
    if as_points:
        spots = PointsModel.parse(pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}, index=ids), transformations=tf)
        elements = {"points": {"spots": spots}}
    else:
        spots = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), pitch / 4), index=pd.Index(ids),
                                  transformations=tf)
        elements = {"shapes": {"spots": spots}}
    order = rng.permutation(len(xy))  # table rows in another order than the spots
    counts = rng.poisson(4.0, size=(len(xy), genes)).astype(np.float32)
    barcodes = [f"bc{i:02d}" for i in order]
    names = [f"G{g}" for g in range(genes)]
    table = ad.AnnData(X=counts, obs=pd.DataFrame({"region": pd.Categorical(["spots"] * len(xy)),
                                                   "spot_id": ids[order]}, index=barcodes),
                       var=pd.DataFrame(index=names))
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
        sd.SpatialData(images=images, tables={"table": table}, **elements).write(path)
    return {"barcodes": barcodes, "counts": counts, "genes": names, "xy": xy[order], "image": image}


HE_STAINS = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # OD of haematoxylin, eosin per RGB channel


def he_pixels(conc: np.ndarray, stains: np.ndarray = HE_STAINS, scale=(1.0, 1.0)) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` of stain concentrations ``conc`` ``[..., 2]`` (Beer-Lambert, light 240 as in
    :mod:`gnnst.data.stain`): ``stains`` ``[3, 2]`` (columns normalised here), each stain's concentration x ``scale``."""
    s = stains / np.linalg.norm(stains, axis=0, keepdims=True)
    od = (conc * np.asarray(scale)) @ s.T
    return np.clip(240.0 * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


def he_concentrations(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``[h, w, 2]`` haematoxylin and eosin concentrations of a synthetic tissue: smooth eosin-rich stroma with
    haematoxylin-dense nuclei (blobs) whose density varies across the image."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    h, w = shape
    eosin = 0.6 + 0.6 * gaussian_filter(rng.random((h, w)), 6) / 0.5
    density = gaussian_filter(rng.random((h, w)), 25)
    nuclei = gaussian_filter((rng.random((h, w)) < 0.04 * density / density.mean()).astype(float), 1.5) * 12
    nuclei = np.clip(nuclei, 0, 1.6)
    return np.stack([0.05 + nuclei, np.clip(eosin, 0, 2) * (1 - 0.9 * np.clip(nuclei, 0, 1))], axis=-1)


def write_he_image(path: Path, size: tuple[int, int], *, seed: int = 0, stains: np.ndarray = HE_STAINS,
                   scale=(1.0, 1.0)) -> np.ndarray:
    """A synthetic H&E image (``size`` = (w, h)) stained with ``stains`` x ``scale``, saved as high-quality JPEG;
    returns its concentrations ``[h, w, 2]`` (the same ``seed`` gives the same tissue in another stain)."""
    from PIL import Image

    conc = he_concentrations((size[1], size[0]), seed)
    Image.fromarray(he_pixels(conc, stains, scale)).save(path, quality=97)
    return conc


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], features: list[tuple[str, str, str]]) -> None:
    """A 10x feature-barcode HDF5 (``filtered_feature_bc_matrix.h5``) of ``counts`` ``[barcodes, features]``;
    ``features``: (id, name, feature_type). CSC features x barcodes == CSR barcodes x features."""
    import h5py
    import scipy.sparse as sp

    m = sp.csr_matrix(counts)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array([len(features), len(barcodes)], dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        feat = g.create_group("features")
        for i, key in enumerate(("id", "name", "feature_type")):
            feat[key] = np.array([fe[i] for fe in features], dtype="S")
        feat["genome"] = np.array(["GRCh38"] * len(features), dtype="S")
        feat["_all_tag_keys"] = np.array([b"genome"])


def he_like_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``[h, w, 3]`` uint8 that looks like H&E to an ImageNet encoder: pink stroma with wavy fibres and
    purple nuclei (``size`` = (w, h))."""
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.array([232, 190, 210]) + rng.normal(0, 6, 3)
    ang = rng.uniform(0, np.pi)
    wave = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) / rng.uniform(6, 14) + rng.uniform(0, 6))
    img += wave[..., None] * np.array([-10, -25, -15])
    for _ in range(int(rng.integers(25, 60) * w * h / 224 ** 2)):  # nuclei
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 8)
        m = (xx - cx) ** 2 + ((yy - cy) * rng.uniform(0.6, 1.4)) ** 2 < r * r
        img[m] = np.array([95, 60, 140]) + rng.normal(0, 12, 3)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def untimed(x):
    """``x`` (a metrics.json value) without its timings (``*second*`` keys: durations, rates), for comparing
    two runs' figures."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if "second" not in k}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def epoch_features(g, epoch: int, seed: int, index: int = 0):
    """``[N, D]``: the views :func:`gnnst.train.views.epoch_pick` draws for each spot of ``g``, materialised
    (what a sampler should read through ``x_pick``; the oracle of the view tests)."""
    import torch

    from gnnst import keys
    from gnnst.train.views import epoch_pick

    views = getattr(g, keys.DATA_X_VIEWS)
    return views[epoch_pick(g, epoch, seed, index), torch.arange(views.shape[1])]
