"""`gnnst predict --grid-um` on a small pyramidal TIFF: spots over the tissue only, outputs, errors."""

from __future__ import annotations

import re
import anndata as ad
import numpy as np
import pytest

from gnnst.cli import main

MPP = 0.5  # µm per level-0 pixel, written as TIFF resolution tags
SIZE = (3000, 2400)  # level-0 width, height
BLOB = (1100.0, 1300.0, 700.0, 600.0)  # tissue ellipse: centre x, y and radii, pixels
SPECK = (2000.0, 80 + 2 * 160 * np.sqrt(3) / 2, 20.0)  # a stained speck on grid point 12x2 of an 80 µm hex grid
GENES = [f"G{i}" for i in range(8)]


def draw_slide(width: int, height: int, step: int = 1) -> np.ndarray:
    """RGB ``[height // step, width // step, 3]``: white glass, a textured pink ellipse, a speck."""
    yy, xx = np.mgrid[0:height:step, 0:width:step].astype(np.float32)
    img = np.full(yy.shape + (3,), 246, np.uint8)
    cx, cy, rx, ry = BLOB
    tissue = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    shade = (np.sin(xx / 9.0) * np.cos(yy / 7.0) * 30).astype(np.int16)  # some texture for the encoder
    for c, v in enumerate((215, 120, 185)):
        img[..., c][tissue] = np.clip(v + shade[tissue], 0, 255)
    sx, sy, sr = SPECK
    img[(xx - sx) ** 2 + (yy - sy) ** 2 <= sr * sr] = (200, 90, 170)
    return img


def write_pyramid_tiff(path, *, mpp: float | None = MPP, levels=(1, 2, 4), tile=256) -> None:
    """Tiled pyramidal TIFF, one page per level (the layout openslide reads as 'generic-tiff')."""
    import tifffile

    w, h = SIZE
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate(levels):
            img = draw_slide(w, h, ds)
            kw = dict(resolution=(1e4 / (mpp * ds),) * 2, resolutionunit="CENTIMETER") if mpp else \
                dict(resolution=(1.0, 1.0), resolutionunit="NONE")
            tw.write(img, tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=0 if i == 0 else 1, **kw)


def make_model(path, *, patch_size_um: float = 250.0):
    """A tiny untrained GNNST for the default encoder's 1280-wide embeddings, saved as a TrainedModel."""
    from gnnst.config import GraphConfig, ModelConfig
    from gnnst.data.encoders import create_encoder
    from gnnst.predictor import EncoderInfo, TrainedModel

    tm = TrainedModel.untrained(EncoderInfo.of(create_encoder("efficientnet_lite0")), GENES,
                                model_config=ModelConfig(hidden=32, proj_dim=16, heads=2, predict_mode="head"),
                                patch_size_um=patch_size_um, graph=GraphConfig(k=6), batch_nodes=64)
    tm.save(path)
    return tm


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    d = tmp_path_factory.mktemp("wsi")
    write_pyramid_tiff(d / "slide.tif")
    make_model(d / "model.pt")
    return d


@pytest.fixture(scope="module")
def grid_run(wsi):
    out = wsi / "run" / "slide_pred.h5ad"
    rc = main(["predict", "--checkpoint", str(wsi / "model.pt"), "--image", str(wsi / "slide.tif"),
               "--grid-um", "80", "--supersample", "1", "--out", str(out), "--cache-dir", str(wsi / "cache"),
               "--quiet"])
    return rc, out


def test_openslide_reads_the_test_tiff_as_a_pyramid_with_mpp(wsi):
    from gnnst.data.images import open_image

    with open_image(wsi / "slide.tif") as im:
        assert im._slide.properties["openslide.vendor"] == "generic-tiff"
        assert im.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert im.mpp == pytest.approx(MPP)
        thumb = im.thumbnail(600)  # assembled tile by tile from level 2
        ref = np.asarray(im._slide.get_thumbnail((600, 600)).convert("RGB"))
    assert thumb.shape == ref.shape == (480, 600, 3)
    assert np.abs(thumb.astype(int) - ref.astype(int)).mean() < 3


def test_patches_come_from_the_level_that_keeps_the_encoder_input():
    from gnnst.data.patches import choose_level

    ds = (1.0, 2.0, 4.0, 16.0)
    assert choose_level(ds, 500, 224) == 1  # 500 / 2 = 250 >= 224 > 500 / 4
    assert choose_level(ds, 4000, 224) == 3
    assert choose_level(ds, 100, 224) == 0  # smaller than the input everywhere: full resolution
    assert choose_level((1.0,), 1000, 224) == 0


def test_grid_predict_covers_the_tissue_only(grid_run):
    rc, out = grid_run
    assert rc == 0
    a = ad.read_h5ad(out)
    xy = a.obsm["spatial"]
    cx, cy, rx, ry = BLOB
    r = np.sqrt(((xy[:, 0] - cx) / rx) ** 2 + ((xy[:, 1] - cy) / ry) ** 2)
    assert (r <= 1.03).all()  # every spot is on the tissue (mask resolution ~ 1.5 px of 3000)
    pitch = 80 / MPP
    expected = np.pi * rx * ry / (pitch * pitch * np.sqrt(3) / 2)  # hex cells inside the ellipse
    assert 0.85 * expected <= a.n_obs <= 1.1 * expected
    assert all(re.fullmatch(r"\d+x\d+", b) for b in a.obs_names)  # "<col>x<row>"
    assert "6x9" in a.obs_names  # the grid point at the blob's centre, (1120, 1327)
    assert "12x2" not in a.obs_names  # the speck's grid point: specks are not tissue
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    assert np.allclose(d[:, 1], pitch)  # a hexagonal grid at the requested pitch


def test_grid_predict_output_fields(grid_run):
    rc, out = grid_run
    a = ad.read_h5ad(out)
    assert list(a.var_names) == GENES
    assert np.allclose(a.X, a.layers["gnnst_pred"]) and np.isfinite(a.X).all()
    assert a.obsm["X_img_efficientnet_lite0"].shape == (a.n_obs, 1280)
    assert a.obsp["spatial_connectivities"].shape == (a.n_obs, a.n_obs)
    assert (a.obsp["spatial_connectivities"].sum(1) == 6).all()  # the model's k
    assert a.uns["spatial_neighbors"]["connectivities_key"] == "spatial_connectivities"
    lib = a.uns["spatial"]["slide"]
    hires = lib["images"]["hires"]
    sf = lib["scalefactors"]
    assert hires.dtype == np.uint8 and hires.shape[2] == 3
    assert sf["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / SIZE[0])
    assert sf["spot_diameter_fullres"] == pytest.approx(80 / MPP)
    assert a.uns["gnnst"]["mpp"] == pytest.approx(MPP)
    assert a.uns["gnnst"]["grid"]["kind"] == "hex"
    for g in GENES[:3]:  # default maps: the panel's top-3 HEG
        assert (out.parent / f"slide_pred_{g}.png").stat().st_size > 1000


def test_supersampled_square_grid_is_the_mean_of_its_shifted_copies(wsi):
    from scipy.spatial import cKDTree

    from gnnst.data.grid import cell_offsets
    from gnnst.inference import predict_grid, predict_slide, write_grid_maps
    from gnnst.predictor import TrainedModel

    model = TrainedModel.load(wsi / "model.pt")
    a = predict_grid(model, wsi / "slide.tif", grid_um=160, kind="square", supersample=2, slide_id="slide",
                     cache_dir=str(wsi / "cache"), progress=False)
    xy = a.obsm["spatial"]
    d, _ = cKDTree(xy).query(xy, k=5)
    assert np.allclose(d[:, 1], 160 / MPP) and a.uns["gnnst"]["grid"]["kind"] == "square"
    assert a.uns["gnnst"]["grid"]["patches_per_spot"] == 4 and (a.obsp["spatial_connectivities"].sum(1) == 6).all()
    offs = cell_offsets(160 / MPP, kind="square", supersample=2)
    assert sorted(map(tuple, offs / (160 / MPP))) == [(-0.25, -0.25), (-0.25, 0.25), (0.25, -0.25), (0.25, 0.25)]
    # each copy is the whole grid shifted within its cells and predicted with its own graph
    copies = [predict_slide(model, wsi / "slide.tif", xy + o, list(a.obs_names), slide_id="slide", mpp=MPP,
                            cache_dir=str(wsi / "cache"), progress=False).X for o in offs]
    np.testing.assert_allclose(a.X, np.mean(copies, 0), rtol=1e-4, atol=1e-4)
    maps = write_grid_maps(a, ["G5", "G7"], wsi / "sq" / "p")
    assert [m.name for m in maps] == ["p_G5.png", "p_G7.png"] and all(m.stat().st_size > 1000 for m in maps)


def test_slide_without_mpp_is_an_error(wsi, tmp_path, capsys):
    write_pyramid_tiff(tmp_path / "nompp.tif", mpp=None, levels=(1, 4))
    rc = main(["predict", "--checkpoint", str(wsi / "model.pt"), "--image", str(tmp_path / "nompp.tif"),
               "--grid-um", "80", "--out", str(tmp_path / "p.h5ad"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nompp.tif" in err and "no micrometres per pixel" in err and "--mpp" in err
    assert not (tmp_path / "p.h5ad").exists()


@pytest.mark.parametrize("case, pattern", [
    ("gene", "gene 'NOPE' is not in the panel"),
    ("encoder", "encoder mismatch"),
    ("scaler", "'scaler.mean' has 7 values for a panel of 8 genes"),
])
def test_mismatches_are_errors(wsi, tmp_path, capsys, case, pattern):
    import torch

    ck = torch.load(wsi / "model.pt", weights_only=True)  # the plain data of a TrainedModel file
    extra = []
    if case == "gene":
        extra = ["--plot-genes", "G1,NOPE"]
    elif case == "encoder":
        ck["encoder"]["identity"] = "efficientnet_lite0:other-weights"
    else:
        ck["scaler"]["mean"] = ck["scaler"]["mean"][:-1]
    torch.save(ck, tmp_path / "model.pt")
    rc = main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--image", str(wsi / "slide.tif"),
               "--grid-um", "80", "--out", str(tmp_path / "p.h5ad"), "--quiet", *extra])
    assert rc == 2 and pattern in capsys.readouterr().err
    assert not (tmp_path / "p.h5ad").exists()


def test_plot_genes_needs_a_grid(wsi, tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(wsi / "model.pt"), "--image", str(wsi / "slide.tif"),
               "--spots", str(tmp_path / "spots.csv"), "--plot-genes", "G1", "--out", str(tmp_path / "p.h5ad")])
    assert rc == 2 and "--plot-genes draws grid maps: use it with --grid-um" in capsys.readouterr().err


def test_grid_with_fewer_spots_than_the_checkpoints_k(wsi, tmp_path, capsys):
    """A grid pitch so coarse that the tissue holds fewer grid spots than the model's graph.k + 1: an error
    that says which options change it, before anything is encoded."""
    rc = main(["predict", "--checkpoint", str(wsi / "model.pt"), "--image", str(wsi / "slide.tif"),
               "--grid-um", "400", "--supersample", "1", "--out", str(tmp_path / "p.h5ad"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(r"gnnst: error: the tissue grid of 'slide' \(--grid-um 400\) has \d spots, too few for the "
                     r"checkpoint's graph.k=6 .*use a smaller --grid-um", err), err
    assert list(tmp_path.iterdir()) == []


def test_grid_prediction_carries_spread_and_ood_and_maps_grey_out_flagged_spots(wsi, tmp_path):
    from PIL import Image

    from gnnst.inference import predict_grid, write_grid_maps
    from gnnst.predictor import TrainedModel
    from gnnst.reliability import OODReference

    import torch

    model = TrainedModel.load(wsi / "model.pt")
    g = torch.Generator().manual_seed(1)
    model.states.append({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                         for k, v in model.states[0].items()})  # a second member, slightly perturbed
    model.ood_reference = OODReference.build([np.abs(np.random.default_rng(s).normal(size=(20, 1280))) for s in (0, 1)],
                                             k=5, quantile=0.99, cap=100, seed=0)  # unrelated features: all flagged
    a = predict_grid(model, wsi / "slide.tif", grid_um=160, kind="square", supersample=2, slide_id="slide",
                     cache_dir=str(wsi / "cache"), progress=False)
    assert a.layers["gnnst_sd"].shape == a.X.shape and (a.layers["gnnst_sd"] > 0).any()
    assert a.obs["gnnst_ood"].all() and a.uns["gnnst"]["reliability"]["ood"]["n_flagged"] == a.n_obs

    def greyish(path):
        px = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((px.max(-1) - px.min(-1) < 20) & (px.min(-1) > 130) & (px.max(-1) < 185)).sum())

    flagged = write_grid_maps(a, ["G0"], tmp_path / "flagged")[0]
    a.obs["gnnst_ood"] = False
    clean = write_grid_maps(a, ["G0"], tmp_path / "clean")[0]
    assert greyish(flagged) > 5 * max(greyish(clean), 50)  # flagged spots are drawn grey, without their value

