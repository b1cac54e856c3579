"""Every manifest of the README's "Your own data" section loads and reads, on tiny files laid out at
the paths it names (so the README cannot drift from what gnnst accepts)."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from gnnst_testdata import REPO, write_legacy_slide, write_spatialdata_store
from gnnst.data.manifest import load_manifest
from gnnst.data.slides import read_slide
from gnnst.io import atomic_write_h5ad

from test_readers_spaceranger import KEPT, make_outs


def readme_manifests() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own data"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    return {re.search(r"^name: (\S+)", b, flags=re.M).group(1): b for b in blocks}


def _tiled_tiff(path, size=(2400, 1400)):
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((size[1], size[0], 3), 200, dtype=np.uint8), tile=(256, 256),
                     photometric="rgb")


def _spaceranger_fullres(root):
    make_outs(root / "V1_A")
    _tiled_tiff(root / "V1_A" / "V1_A_fullres.tif")
    return KEPT


def _spaceranger_hires(root):
    outs = make_outs(root / "V1_B")
    Image.new("RGB", (240, 140)).save(outs / "spatial" / "tissue_hires_image.png")
    return KEPT


def _spot_adata(counts_in, *, uns=None):
    X = np.array([[1, 0, 2], [0, 3, 1], [4, 0, 0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = ad.AnnData(X=sp.csr_matrix(X if counts_in == "X" else np.log1p(X)),
                       obs=pd.DataFrame(index=["s0", "s1", "s2"]), var=pd.DataFrame(index=["G1", "G2", "G3"]))
    if counts_in != "X":
        a.layers[counts_in] = sp.csr_matrix(X)
    a.obsm["spatial"] = np.array([[100.0, 100.0], [300.0, 100.0], [100.0, 300.0]])
    a.uns.update(uns or {})
    return a


def _hest(root):
    (root / "st").mkdir(parents=True)
    atomic_write_h5ad(_spot_adata("X"), root / "st" / "TENX95.h5ad")
    _tiled_tiff(root / "wsis" / "TENX95.tif", size=(512, 512))
    (root / "metadata").mkdir()
    (root / "metadata" / "TENX95.json").write_text(json.dumps({"pixel_size_um_estimated": 0.5}))
    return ["s0", "s1", "s2"]


def _legacy_st(root):
    truth = write_legacy_slide(root / "tmp", "BC1")
    (root / "BC1").mkdir()
    for src, dst in (("BC1.tsv.gz", "counts.tsv.gz"), ("BC1_selection.tsv", "spot_data-selection.tsv"),
                     ("BC1_HE.jpg", "HE.jpg")):
        shutil.move(root / "tmp" / src, root / "BC1" / dst)
    p = root / "BC1" / "counts.tsv.gz"  # a counts row for an array spot the spot table lacks
    lines = gzip.open(p, "rt").read().splitlines()
    with gzip.open(p, "wt") as f:
        f.write("\n".join(lines + ["33x33" + lines[1][lines[1].index("\t"):]]) + "\n")
    return truth["ids"]


def _h5ad(root):
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_h5ad(_spot_adata("counts"), root / "S1.h5ad")
    Image.new("RGB", (400, 400)).save(root / "S1_HE.png")
    return ["s0", "s1", "s2"]


def _spatialdata(root):
    truth = write_spatialdata_store(root / "V1_C.zarr", image_name="V1_C_full_image")
    return truth["barcodes"]


LAYOUTS = {"my_visium": _spaceranger_fullres, "my_visium_hires": _spaceranger_hires, "my_hest": _hest,
           "my_legacy_st": _legacy_st, "my_h5ad": _h5ad, "my_spatialdata": _spatialdata}


def test_readme_lists_the_expected_manifests():
    assert set(readme_manifests()) == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_readme_manifest_loads_and_reads(tmp_path, name):
    if name in ("my_visium", "my_hest"):
        pytest.importorskip("openslide")
    if name == "my_spatialdata":
        pytest.importorskip("spatialdata")
    text = readme_manifests()[name]
    (tmp_path / "m.yaml").write_text(text)
    root = tmp_path / "data"
    expected = LAYOUTS[name](root)
    m = load_manifest(tmp_path / "m.yaml")
    for s in m.slides:
        a = read_slide(m, s, data_root=str(root), cache_dir=str(tmp_path / "cache"), download=False,
                       patch_size_um=150.0)
        assert list(a.obs_names) == expected
        assert a.uns["gnnst"]["mpp"] > 0 and a.uns["gnnst"]["image_path"]
