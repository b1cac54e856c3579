"""Space Ranger ``outs/`` folders named in a manifest, with and without the full-resolution image
(issue 11, items 1 and 2): folder roles and their checksum, the hires/lowres fallback with its scale,
patches cut where the spots are, and a slide without any image refused before any work."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
from PIL import Image

from gnnst import keys
from gnnst.data.manifest import folder_sha256, load_manifest, resolve_files
from gnnst.data.slides import read_slide
from gnnst.data.validate import image_coordinates
from gnnst.errors import GnnstError

from test_readers_spaceranger import KEPT, KEPT_XY, make_outs

HIRES_SCALEF, LOWRES_SCALEF = 0.1, 0.03  # make_outs' scalefactors; mpp = 55 / 110 = 0.5 µm per full-res px
COLOURS = {"AAAC-1": (255, 0, 0), "AAAG-1": (0, 255, 0), "AACA-1": (0, 0, 255)}


def write_png(outs, res: str, scalef: float, *, square: int = 10) -> np.ndarray:
    """A PNG of ``outs/spatial`` (grey) with a coloured square around each kept spot, at ``scalef``."""
    img = np.full((int(1400 * scalef), int(2400 * scalef), 3), 128, dtype=np.uint8)
    for bc, (x, y) in zip(KEPT, KEPT_XY * scalef):
        h = square // 2
        img[int(round(y)) - h:int(round(y)) + h, int(round(x)) - h:int(round(x)) + h] = COLOURS[bc]
    Image.fromarray(img).save(outs / "spatial" / f"tissue_{res}_image.png")
    return img


def write_manifest(path, outs_rel: str = "outs", *, sha: str | None = None, image: str | None = None,
                   options: str = "") -> object:
    lines = ["name: sr", "reader: spaceranger", "slides:", "  - slide_id: V1", "    files:",
             f"      outs: {{path: {outs_rel}" + (f", sha256: {sha}" if sha else "") + "}"]
    if image:
        lines.append(f"      image: {{path: {image}}}")
    if options:
        lines.append(f"    reader_options: {options}")
    path.write_text("\n".join(lines) + "\n")
    return load_manifest(path)


@pytest.fixture
def outs(tmp_path):
    o = make_outs(tmp_path)
    write_png(o, "hires", HIRES_SCALEF)
    write_png(o, "lowres", LOWRES_SCALEF)
    return o


def test_manifest_role_names_the_outs_folder(tmp_path, outs):
    m = write_manifest(tmp_path / "m.yaml")
    files = resolve_files(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert files["outs"] == outs and outs.is_dir()
    a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert list(a.obs_names) == KEPT


def test_folder_checksum_is_the_sha256_of_the_listing(tmp_path, outs):
    digest, used = folder_sha256("spaceranger", outs)
    rel = sorted(p.relative_to(outs).as_posix() for p in used)
    assert rel == ["filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json",
                   "spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png",
                   "spatial/tissue_positions.csv"]
    listing = "".join(f"{hashlib.sha256((outs / r).read_bytes()).hexdigest()}  {r}\n" for r in rel)
    assert digest == hashlib.sha256(listing.encode()).hexdigest()
    (outs / "possorted_genome_bam.bam").write_bytes(b"not read by gnnst")  # files the reader ignores do not count
    assert folder_sha256("spaceranger", outs)[0] == digest

    kw = dict(data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    m = write_manifest(tmp_path / "m.yaml", sha=digest)
    assert resolve_files(m, m.slides[0], **kw)["outs"] == outs
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 111.0}))
    with pytest.raises(GnnstError, match=r"outs: checksum mismatch for 'V1' outs \(sha256 of the listing of 5 files"):
        resolve_files(m, m.slides[0], **kw)


def test_sha256_skip_warns_and_bad_digest_is_refused_at_load(tmp_path, outs, caplog):
    m = write_manifest(tmp_path / "m.yaml", sha="skip")
    entry = m.slides[0].files["outs"]
    assert entry.skip_check and entry.sha256 is None  # "skip" is never taken for a digest (e.g. a cache identity)
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        resolve_files(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert "slide 'V1' outs folder is not checksummed (sha256: skip" in caplog.text
    with pytest.raises(GnnstError, match=r"m.yaml: 'slides\[0\].files.outs.sha256' must be 64 hex digits or 'skip', "
                                         r"got 'abc'"):
        write_manifest(tmp_path / "m.yaml", sha="abc")


def test_role_pointing_at_the_h5_inside_outs_reads_its_folder(tmp_path, outs):
    m = write_manifest(tmp_path / "m.yaml", "outs/filtered_feature_bc_matrix.h5")
    a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert list(a.obs_names) == KEPT
    assert a.uns["gnnst"]["image_path"] == str(outs / "spatial" / "tissue_hires_image.png")
    m = write_manifest(tmp_path / "m.yaml", "outs/spatial/scalefactors_json.json")
    with pytest.raises(GnnstError, match=r"'outs' must be the outs/ folder .*name its folder instead"):
        read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))


def test_hires_image_with_its_scale_when_no_full_resolution_image(tmp_path, outs, caplog):
    m = write_manifest(tmp_path / "m.yaml")
    with caplog.at_level(logging.INFO, logger="gnnst"):
        a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"), patch_size_um=400.0)
    meta = a.uns["gnnst"]
    assert meta["image_path"] == str(outs / "spatial" / "tissue_hires_image.png")
    assert meta[keys.IMAGE_SCALEF] == HIRES_SCALEF and meta["mpp"] == 0.5  # mpp stays per full-resolution px
    np.testing.assert_array_equal(a.obsm["spatial"], KEPT_XY)  # full-resolution pixels, as scanpy expects
    xy, image_mpp = image_coordinates(a)
    np.testing.assert_allclose(xy, KEPT_XY * HIRES_SCALEF)
    assert image_mpp == pytest.approx(5.0)
    assert "using the hires image" in caplog.text and "5 µm/px" in caplog.text
    assert "400 µm patches are 80 px" in caplog.text and "UNRELIABLE" not in caplog.text


def test_lowres_image_when_no_hires(tmp_path, outs):
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    m = write_manifest(tmp_path / "m.yaml")
    a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert a.uns["gnnst"]["image_path"].endswith("tissue_lowres_image.png")
    assert a.uns["gnnst"][keys.IMAGE_SCALEF] == LOWRES_SCALEF


def test_full_resolution_image_wins_and_small_patches_warn(tmp_path, outs, caplog):
    Image.new("RGB", (2400, 1400)).save(tmp_path / "he.png")
    m = write_manifest(tmp_path / "m.yaml", image="he.png")
    a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert a.uns["gnnst"]["image_path"] == str(tmp_path / "he.png") and a.uns["gnnst"][keys.IMAGE_SCALEF] == 1.0
    m = write_manifest(tmp_path / "m.yaml")
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"), patch_size_um=100.0)
    assert "UNRELIABLE: 100 µm patches are only 20 px wide" in caplog.text and "m.yaml" in caplog.text


def test_lowres_spots_were_refused_as_off_the_image_before(tmp_path, outs):
    """The full-resolution coordinates lie outside the 72 x 42 px lowres image; scaled, they lie on it."""
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    m = write_manifest(tmp_path / "m.yaml")
    a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    w, h = Image.open(a.uns["gnnst"]["image_path"]).size
    assert (KEPT_XY[:, 0] >= w).all()  # unscaled they would be off the image
    xy, _ = image_coordinates(a)
    assert (xy[:, 0] < w).all() and (xy[:, 1] < h).all()


def test_patches_are_cut_around_the_spots_of_the_hires_image(tmp_path, outs):
    """Mean colour of each spot's patch (a pooling "encoder") is the colour drawn around that spot."""
    import torch

    from gnnst.data.embeddings import embed_spots
    from gnnst.data.encoders import PatchEncoder

    m = write_manifest(tmp_path / "m.yaml")
    a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    enc = PatchEncoder(name="meanrgb", model=pool, input_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), dim=3,
                       identity="meanrgb")
    # 40 µm = 8 hires px (5 µm/px), inside the 10 px squares
    emb = embed_spots(a, enc, size_um=40.0, batch_size=2, progress=False)
    np.testing.assert_allclose(emb * 255, [COLOURS[b] for b in KEPT], atol=2)


def test_slide_without_any_image_is_one_error_naming_slide_and_manifest(tmp_path):
    make_outs(tmp_path)
    m = write_manifest(tmp_path / "m.yaml")
    with pytest.raises(GnnstError, match=r"m.yaml: slide 'V1' has no image to cut patches from: give 'files.image' "
                                         r".*spatial/tissue_hires_image.png"):
        read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))


def test_build_graphs_without_image_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import gnnst.graph.dataset as dataset
    from gnnst.cli import main

    make_outs(tmp_path)
    write_manifest(tmp_path / "m.yaml")
    loads = []
    monkeypatch.setattr(dataset, "_load_encoder", lambda *a: loads.append(a))  # no model is built: no work
    rc = main(["build-graphs", "--manifest", str(tmp_path / "m.yaml"), "--data-root", str(tmp_path),
               "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "g"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()  # log lines (the duplicate gene ACTB), then the error
    assert rc == 2 and err[-1].startswith("gnnst: error: ") and "slide 'V1' has no image" in err[-1]
    assert "Traceback" not in "\n".join(err) and not loads
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


def test_export_image_scale_maps_full_resolution_spots_onto_the_hires_image(tmp_path, outs):
    """squidpy draws obsm['spatial'] * tissue_hires_scalef on uns['spatial'][...]['images']['hires']."""
    from gnnst.export.anndata import add_image

    m = write_manifest(tmp_path / "m.yaml")
    a = read_slide(m, m.slides[0], data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    meta = a.uns["gnnst"]
    add_image(a, meta["image_path"], library_id="V1", mpp=meta["mpp"], image_scalef=meta[keys.IMAGE_SCALEF],
              max_side=120)  # the 240 px hires PNG halved
    lib = a.uns["spatial"]["V1"]
    scalef = lib["scalefactors"]["tissue_hires_scalef"]
    assert scalef == pytest.approx(HIRES_SCALEF / 2)
    img = lib["images"]["hires"]
    for bc, (x, y) in zip(KEPT, a.obsm["spatial"] * scalef):
        np.testing.assert_allclose(img[int(y), int(x)], COLOURS[bc], atol=40)
