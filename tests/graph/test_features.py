"""Per-slide standardisation of embeddings (gnnst.graph.features) and its record in the TrainedModel."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from gnnst.errors import GnnstError


def test_slide_norm_uses_the_slides_own_statistics():
    from gnnst.graph.features import SlideNorm

    rng = np.random.default_rng(0)
    train = [rng.normal(0, 1, (80, 4)), rng.normal(1, 2, (60, 4))]
    norm = SlideNorm.fit(train, min_spots=50)
    shifted = rng.normal(5, 3, (70, 4)).astype(np.float32)
    out = norm.apply(shifted, slide="slide 'X'")
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-4)
    # a colour-shifted copy of a slide (its embeddings moved and scaled per dimension) becomes the same input
    np.testing.assert_allclose(norm.apply(shifted * 1.7 - 4.0), out, atol=1e-4)


def test_slide_norm_pools_the_slides_one_at_a_time():
    """The training statistics are read slide by slide (a generator, each slide once) and equal those of
    the slides concatenated: slides of other means and spreads, so that a pooling without the between-slide
    term would be far off."""
    from gnnst.graph.features import SlideNorm

    rng = np.random.default_rng(4)
    slides = [rng.normal(m, sd, (n, 6)).astype(np.float16) for m, sd, n in ((0, 1, 90), (4, 0.5, 30), (-3, 2, 200),
                                                                              (1, 1, 1))]
    read = []

    def one_at_a_time():
        for i, x in enumerate(slides):
            read.append(i)
            yield x

    norm = SlideNorm.fit(one_at_a_time(), min_spots=50)
    assert read == [0, 1, 2, 3]
    whole = np.concatenate([x.astype(np.float64) for x in slides])
    np.testing.assert_allclose(norm.mean, whole.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(norm.std, whole.std(0), rtol=1e-6)
    assert norm.mean.dtype == norm.std.dtype == np.float32


def test_a_small_slide_falls_back_to_the_training_statistics_with_a_warning(caplog):
    from gnnst.graph.features import SlideNorm

    rng = np.random.default_rng(1)
    train = [rng.normal(2, 3, (200, 3))]
    norm = SlideNorm.fit(train, min_spots=50)
    small = rng.normal(0, 1, (10, 3)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="gnnst"):
        out = norm.apply(small, slide="slide 'tiny'")
    assert "slide 'tiny': 10 spots, fewer than features.min_spots=50" in caplog.text
    np.testing.assert_allclose(out, (small - norm.mean) / norm.std, rtol=1e-5)


def test_feature_state_round_trip_and_checks():
    from gnnst.data.stain import StainStats
    from gnnst.graph.features import FeatureState, SlideNorm

    ref = StainStats("macenko", np.eye(3)[:, :2], np.array([1.0, 2.0]), 500)
    st = FeatureState(slide_norm=SlideNorm(50, np.zeros(4, np.float32), np.ones(4, np.float32)),
                      stain_norm="macenko", stain_reference=ref)
    back = FeatureState.from_dict(st.to_dict())
    assert back.stain_norm == "macenko" and back.stain_reference.identity == ref.identity
    np.testing.assert_array_equal(back.slide_norm.std, st.slide_norm.std)
    assert FeatureState.from_dict(None).describe() == "slide_norm=none, stain_norm=none"  # an older model file
    with pytest.raises(GnnstError, match="stain_norm 'reinhard' with a 'macenko' reference"):
        FeatureState.from_dict({**st.to_dict(), "stain_norm": "reinhard"})
    with pytest.raises(GnnstError, match="stain_norm 'macenko' and its stain reference disagree"):
        FeatureState.from_dict({**st.to_dict(), "stain_reference": None})


def test_trained_model_records_and_applies_the_normalisation(tmp_path):
    from gnnst.graph.features import FeatureState, SlideNorm
    from gnnst.predictor import TrainedModel
    from test_predictor import D, _toy_graph, make_model

    tm = make_model(members=1, alpha=1.0)
    g = _toy_graph(60)
    tm.feature_norm = FeatureState(slide_norm=SlideNorm(20, np.zeros(D, np.float32), np.ones(D, np.float32)))
    back = TrainedModel.load(tm.save(tmp_path / "m.pt"))
    assert back.feature_norm.slide_norm is not None and back.feature_norm.slide_norm.min_spots == 20
    shifted = g.clone()
    shifted.x = g.x * 2.5 + 3.0  # the slide's embeddings shifted and scaled per dimension
    np.testing.assert_allclose(back.features(shifted), back.features(g), atol=1e-4)
    p, q = back.predict(g).expression, back.predict(shifted).expression
    np.testing.assert_allclose(p, q, atol=1e-3)
    from gnnst.reliability import OODReference  # OOD scores compare the normalised features, through features()

    back.ood_reference = OODReference.build([back.features(_toy_graph(40, seed=s)) for s in (1, 2)], k=3,
                                            quantile=0.95, cap=100, seed=0)
    np.testing.assert_allclose(back.predict(shifted).ood_score, back.predict(g).ood_score, atol=1e-3)
    plain = make_model(members=1, alpha=1.0)  # without normalisation the shift moves the predictions
    assert np.abs(plain.predict(g).expression - plain.predict(shifted).expression).mean() > 10 * np.abs(p - q).mean()
    wrong = FeatureState(slide_norm=SlideNorm(20, np.zeros(D + 1, np.float32), np.ones(D + 1, np.float32)))
    tm.feature_norm = wrong
    with pytest.raises(GnnstError, match="'feature_norm.slide_norm' has statistics of width"):
        tm.save(tmp_path / "bad.pt")


def test_prediction_never_reads_augmented_views():
    from gnnst import keys
    from test_predictor import _toy_graph, make_model

    tm = make_model(members=1)
    g = _toy_graph(40)
    with_views = g.clone()
    setattr(with_views, keys.DATA_X_VIEWS, torch.stack([g.x, g.x + 10.0, g.x * -3.0]))  # [V, N, D]
    np.testing.assert_array_equal(tm.predict(g).expression, tm.predict(with_views).expression)
    assert "x_views" not in str(sorted(tm.to_dict()))


@pytest.mark.parametrize("override, msg", [
    ("features.min_spots=1", "features.min_spots': expected an integer >= 2"),
    ("features.stain_augment=-1", "features.stain_augment': expected an integer in [0, 32]"),
    ("features.stain_norm=vahadane", "features.stain_norm': expected one of 'none', 'macenko', 'reinhard'"),
    ("features.slide_norm=zscore", "features.slide_norm': expected one of 'none', 'standardize'"),
    ("features.stain_augment_sigma=1.5", "features.stain_augment_sigma': expected a number in [0, 1)"),
])
def test_features_config_ranges(override, msg):
    from gnnst.config import load_config

    with pytest.raises(GnnstError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_stain_reference_estimates_on_a_bounded_sample_of_the_training_slides(monkeypatch):
    """Up to data.stain.REFERENCE_PIXELS the reference pools every sampled pixel of every training slide (the
    her2st reference is unchanged); above it each slide gives its share, a seeded subsample of its own pixels,
    and the stain estimated on it is that of the whole pool within a few degrees."""
    import anndata as ad
    import pandas as pd

    from gnnst import keys
    from gnnst.data import stain as S
    from gnnst.graph import features as F
    from gnnst_testdata import he_concentrations, he_pixels

    slides = {f"s{i}": he_pixels(he_concentrations((40, 50), i)).reshape(-1, 3) for i in range(4)}  # 2,000 px each
    monkeypatch.setattr(F, "slide_pixels", lambda a, **kw: slides[F._slide_name(a)])
    pooled, estimate = [], S.estimate
    monkeypatch.setattr(S, "estimate", lambda m, px, where="": pooled.append(px) or estimate(m, px, where=where))
    adatas = [ad.AnnData(obs=pd.DataFrame({keys.SLIDE_ID: [s]}, index=["spot"])) for s in slides]

    whole = F.stain_reference(adatas, "macenko", size_um=100.0, n_spots=10)
    np.testing.assert_array_equal(pooled[-1], np.concatenate(list(slides.values())))
    monkeypatch.setattr(S, "REFERENCE_PIXELS", 4000)
    part = F.stain_reference(adatas, "macenko", size_um=100.0, n_spots=10)
    assert len(pooled[-1]) == 4000
    for share, own in zip(np.split(pooled[-1], 4), slides.values(), strict=True):
        assert {tuple(p) for p in share} <= {tuple(p) for p in own}
    assert np.abs(part.a - whole.a).max() < 0.05
    again = F.stain_reference(adatas, "macenko", size_um=100.0, n_spots=10)
    np.testing.assert_array_equal(again.a, part.a)  # seeded: the same reference every time


def test_sampled_pixels_are_kept_on_disk_for_the_next_run(tmp_path, monkeypatch):
    """With a cache folder a slide's sampled pixels are written once and read back by a later process (the
    per-process cache emptied), so a warm run decodes no image for its stain; another sampling is another
    file, and a damaged file is sampled again."""
    import anndata as ad
    import pandas as pd

    from gnnst import keys
    from gnnst.data import stain as S
    from gnnst.graph import features as F

    image = tmp_path / "slide.jpg"
    image.write_bytes(b"not decoded here")
    a = ad.AnnData(obs=pd.DataFrame({keys.SLIDE_ID: ["s1"] * 3}, index=["a", "b", "c"]))
    a.obsm[keys.SPATIAL] = np.array([[10.0, 10.0], [50.0, 10.0], [10.0, 50.0]])
    a.uns[keys.UNS_GNNST] = {keys.MPP: 0.5, keys.IMAGE_PATH: str(image)}
    calls = []

    def sample(adata, *, size_um, n_spots, pad_value=255, image=None):
        calls.append(n_spots)
        return np.random.default_rng(n_spots).integers(0, 256, (40, 3), dtype=np.uint8)

    monkeypatch.setattr(S, "sample_pixels", sample)
    monkeypatch.setattr(F, "_PIXELS", None)  # a new process's empty cache
    cache = tmp_path / "pixels"
    first = F.slide_pixels(a, size_um=100.0, n_spots=8, cache_dir=cache)
    assert calls == [8] and len(list(cache.iterdir())) == 1
    monkeypatch.setattr(F, "_PIXELS", None)
    np.testing.assert_array_equal(F.slide_pixels(a, size_um=100.0, n_spots=8, cache_dir=cache), first)
    assert calls == [8]  # read from the file, not sampled again
    F.slide_pixels(a, size_um=100.0, n_spots=9, cache_dir=cache)
    assert calls == [8, 9] and len(list(cache.iterdir())) == 2
    for f in cache.iterdir():
        f.write_bytes(b"cut")
    monkeypatch.setattr(F, "_PIXELS", None)
    np.testing.assert_array_equal(F.slide_pixels(a, size_um=100.0, n_spots=8, cache_dir=cache), first)
    assert calls == [8, 9, 8]
    monkeypatch.setattr(F, "_PIXELS", None)
    F.slide_pixels(a, size_um=100.0, n_spots=8, cache_dir=None, image_id="sha-x")
    assert calls == [8, 9, 8, 8]  # no cache folder: sampled, nothing written


def test_lazy_embeddings_read_a_slide_only_when_it_is_looked_up():
    """Membership (make_graphs, _fit_inputs ask "s in embs" before reading it) reads nothing; a lookup reads
    the slide each time."""
    from gnnst.graph.features import LazyEmbeddings

    reads = []
    embs = LazyEmbeddings({"a": lambda: reads.append("a") or np.zeros((2, 3), np.float32)})
    assert "a" in embs and "b" not in embs and reads == []
    assert embs["a"].shape == (2, 3) and reads == ["a"]
