"""Stain normalisation and augmentation (gnnst.data.stain) on hand-made stains: Beer-Lambert images of
known stain vectors and concentrations."""

from __future__ import annotations

import numpy as np
import pytest

from gnnst.data import stain as S
from gnnst.errors import GnnstError
from gnnst_testdata import HE_STAINS, he_concentrations, he_pixels

SHIFTED = np.array([[0.50, 0.25], [0.80, 0.85], [0.30, 0.35]])  # another lab's haematoxylin and eosin


def _image(stains=HE_STAINS, scale=(1.0, 1.0), seed=0):
    return he_pixels(he_concentrations((96, 128), seed), stains, scale)


def test_macenko_recovers_the_stain_vectors():
    st = S.estimate("macenko", _image().reshape(-1, 3))
    want = HE_STAINS / np.linalg.norm(HE_STAINS, axis=0)
    assert st.a.shape == (3, 2) and st.b.shape == (2,)
    assert np.abs(st.a - want).max() < 0.08  # haematoxylin first, eosin second, each within a few degrees


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_a_restained_slide_brings_it_to_the_reference(method):
    ref_img, shifted = _image(), _image(SHIFTED, scale=(1.4, 0.7))  # the same tissue, another stain
    ref = S.estimate(method, ref_img.reshape(-1, 3))
    norm = S.StainNormalizer(S.estimate(method, shifted.reshape(-1, 3)), ref)
    out = norm(shifted[None])[0]  # crops [1, h, w, 3]
    assert out.dtype == np.uint8 and out.shape == shifted.shape
    before = np.abs(shifted.astype(int) - ref_img).mean()
    after = np.abs(out.astype(int) - ref_img).mean()
    assert after < 0.5 * before, (before, after)


def test_a_slide_mapped_to_its_own_stain_is_nearly_unchanged():
    img = _image()
    st = S.estimate("macenko", img.reshape(-1, 3))
    assert np.abs(S.StainNormalizer(st, st)(img).astype(int) - img).mean() < 1.0


def test_macenko_map_is_the_least_squares_concentrations_recoloured():
    """The normaliser's one [3, 3] map of the OD equals Macenko's steps written out: concentrations by least
    squares on the source's stain vectors, scaled to the reference's maxima, re-coloured with its vectors."""
    src = S.estimate("macenko", _image(SHIFTED, scale=(1.4, 0.7)).reshape(-1, 3))
    ref = S.estimate("macenko", _image().reshape(-1, 3))
    rgb = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)  # every colour, not only tissue
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / S.IO)
    conc = np.linalg.lstsq(src.a, od.T, rcond=None)[0] * (ref.b / src.b)[:, None]
    want = np.clip(S.IO * np.exp(-(ref.a @ conc).T) - 1.0, 0, 255).round().astype(np.uint8).reshape(rgb.shape)
    got = S.StainNormalizer(src, ref)(rgb)
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4  # float rounding may move a value at .5 by one level
    assert not np.array_equal(got, rgb)


def test_too_little_tissue_is_a_one_line_error():
    white = np.full((50, 3), 250, np.uint8)
    with pytest.raises(GnnstError, match="slide 'W'.*tissue pixels.*cannot be estimated"):
        S.estimate("macenko", white, where="slide 'W'")
    with pytest.raises(GnnstError, match="unknown stain normalisation"):
        S.estimate("vahadane", _image())


def test_a_slide_with_too_little_tissue_keeps_its_colours_with_a_warning(tmp_path, caplog):
    """The default normalises the stain: a slide whose sampled patches are nearly all background (a few
    spots on glass) is predicted on its own colours, with a warning naming it, not refused."""
    import logging

    from PIL import Image

    from gnnst.data.slides import spots_anndata
    from gnnst.graph.features import FeatureState

    Image.fromarray(np.full((200, 240, 3), 247, np.uint8)).save(tmp_path / "glass.png")
    a = spots_anndata(np.array([[60.0, 60.0], [150.0, 120.0]]), ["a", "b"], slide_id="W", mpp=1.0,
                      image=tmp_path / "glass.png")
    st = FeatureState(stain_norm="macenko", stain_reference=S.estimate("macenko", _image()))
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        assert st.stain_transform(a, size_um=40) is None
    assert "slide 'W'" in caplog.text and "not stain-normalised" in caplog.text
    tissue = spots_anndata(np.array([[60.0, 48.0]]), ["t"], slide_id="T", mpp=1.0, image=tmp_path / "he.png")
    Image.fromarray(_image()).save(tmp_path / "he.png")
    assert st.stain_transform(tissue, size_um=40) is not None  # with tissue: mapped to the reference


def test_hed_jitter_identity_and_determinism():
    img = _image()
    assert np.abs(S.HEDJitter([1, 1, 1], [0, 0, 0])(img).astype(int) - img).max() <= 1
    a, b = S.HEDJitter.draw(0.1, 0.05, (0, "S1", 1)), S.HEDJitter.draw(0.1, 0.05, (0, "S1", 1))
    c = S.HEDJitter.draw(0.1, 0.05, (0, "S1", 2))
    assert a.identity == b.identity != c.identity
    np.testing.assert_array_equal(a(img), b(img))
    assert np.all(np.abs(a.alpha - 1) <= 0.1) and np.all(np.abs(a.beta) <= 0.05)
    assert np.abs(a(img).astype(int) - img).mean() > 0.5  # it does change the colours


def test_stats_round_trip_and_identity():
    st = S.estimate("reinhard", _image().reshape(-1, 3))
    back = S.StainStats.from_dict(st.to_dict())
    assert back.identity == st.identity and back.method == "reinhard"
    other = S.estimate("reinhard", _image(SHIFTED).reshape(-1, 3))
    assert S.StainNormalizer(st, back).identity != S.StainNormalizer(other, back).identity


def test_cache_keys_differ_by_normalisation():
    import anndata as ad
    import pandas as pd

    from gnnst import keys
    from gnnst.data.embeddings import cache_key

    a = ad.AnnData(obs=pd.DataFrame(index=["s0", "s1"]))
    a.obsm[keys.SPATIAL] = np.array([[10.0, 10.0], [20.0, 10.0]])
    a.uns[keys.UNS_GNNST] = {keys.MPP: 1.0}
    kw = dict(encoder_identity="enc", input_size=224, size_um=150.0, image_id="img")
    r1 = S.estimate("macenko", _image().reshape(-1, 3))
    r2 = S.estimate("macenko", _image(seed=3).reshape(-1, 3))  # another fold's reference
    src = S.estimate("macenko", _image(SHIFTED).reshape(-1, 3))
    plain = cache_key(a, **kw)
    assert cache_key(a, **kw, transform=None) == plain  # unnormalised keys are those of earlier versions
    k1 = cache_key(a, **kw, transform=S.StainNormalizer(src, r1).identity)
    k2 = cache_key(a, **kw, transform=S.StainNormalizer(src, r2).identity)
    k3 = cache_key(a, **kw, transform=S.HEDJitter.draw(0.1, 0.05, (0, "S1", 1), S.StainNormalizer(src, r1)).identity)
    assert len({plain, k1, k2, k3}) == 4
