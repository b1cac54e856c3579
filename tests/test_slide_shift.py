"""Slide-shift corrections end to end on tiny synthetic H&E slides: a colour-shifted copy of a slide is
predicted closer to the original with the normalisation than without; a held-out slide's expression never
reaches the features or the model; augmented views reach training only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnnst_testdata import write_he_image, write_legacy_slide, write_manifest

SHIFTED = np.array([[0.45, 0.30], [0.85, 0.80], [0.30, 0.40]])  # another lab's haematoxylin and eosin
SLIDES = {"S1": "P1", "S2": "P2", "S3": "P3"}
PITCH = 80.0  # px between spots: 200 µm, so 2.5 µm/px and 60-px patches
SIZE = (520, 440)
TINY = ["train.epochs=4", "train.lr=0.003", "train.warmup_epochs=0", "model.dropout=0", "model.input_dropout=0",
        "train.num_threads=1", "encoder.num_threads=1", "train.ensemble=1", "train.patience=10",
        "model.hidden=32", "model.proj_dim=16", "model.heads=2", "model.predict_mode=head", "train.select_blend=false",
        "expression.n_top_expressed=6", "expression.n_top_variable=6", "eval.n_heg=3", "eval.n_hvg=3",
        "train.val_fraction=0.15", "train.batch_nodes=16", "graph.k=4", "features.min_spots=10",
        "features.stain_sample_spots=16"]


@pytest.fixture(scope="module")
def he_data(tmp_path_factory):
    return make_he_data(tmp_path_factory.mktemp("shift"))


def make_he_data(tmp):
    """Three slides of 6 x 5 spots on synthetic H&E, and S1 re-stained (the same tissue, other stain vectors)."""
    root = tmp / "data"
    for i, s in enumerate(SLIDES):
        truth = write_legacy_slide(root, s, seed=i, grid=(6, 5), image_size=SIZE, pitch_px=PITCH)
        conc = write_he_image(root / f"{s}_HE.jpg", SIZE, seed=10 + i)
        _image_driven_counts(root / f"{s}.tsv.gz", truth, conc, seed=i)
    write_he_image(root / "S1_restained.jpg", SIZE, seed=10, stains=SHIFTED, scale=(1.3, 0.75))
    return {"tmp": tmp, "root": root, "manifest": write_manifest(tmp / "m.yaml", SLIDES), "cache": tmp / "cache"}


def _image_driven_counts(path, truth, conc, seed):
    """Rewrite a slide's counts so that its genes follow the stains under each spot (a model has something
    to learn from the image): gene g ~ Poisson(3 + 40 * (w_g . mean H&E concentration around the spot))."""
    import gzip

    rng = np.random.default_rng(seed)
    w = rng.uniform(0, 1, (len(truth["genes"]), 2))
    rows = []
    for sid in truth["ids"]:
        ax, ay = (int(v) for v in sid.split("x"))
        px, py = int(20 + (ax - 2) * PITCH), int(20 + (ay - 2) * PITCH)
        c = conc[max(py - 20, 0):py + 20, max(px - 20, 0):px + 20].reshape(-1, 2).mean(0)  # [2]
        rows.append(rng.poisson(3 + 40 * w @ c))
    lines = ["\t" + "\t".join(truth["genes"])] + [f"{i}\t" + "\t".join(map(str, r)) for i, r in zip(truth["ids"], rows)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def _cfg(d, *extra):
    from gnnst.config import load_config
    from gnnst.graph.dataset import resolve_patch_size

    cfg = load_config(None, [f"data.manifest={d['manifest']}", f"data.data_root={d['root']}",
                             f"data.cache_dir={d['cache']}", *TINY, *extra])
    resolve_patch_size(cfg)
    return cfg


def _loaded(d, cfg):
    from gnnst.graph.dataset import load_and_embed

    return load_and_embed(cfg, progress=False)


def _train(d, loaded, cfg, name):
    """A model trained on S2 and S3 (S1 held out) through the library's fit."""
    from gnnst.predictor import EncoderInfo
    from gnnst.train.ensemble import fit_ensemble
    from gnnst.train.prepare import prepare_training

    ts = prepare_training(cfg, loaded, ["S2", "S3"], ["S1"])
    fold = {"name": name, "train_slides": ["S2", "S3"], "test_slides": ["S1"], "patient_disjoint": True}
    return ts, fit_ensemble(cfg, ts, d["tmp"] / name, fold=fold, encoder=EncoderInfo.from_dict(loaded.encoder),
                            resume=False, device=torch.device("cpu"), progress=False).model


def _restained(d, model) -> tuple[float, float]:
    """How far S1 re-stained is from S1 through gnnst predict's path (:func:`gnnst.inference.predict_slide`),
    each in units of S1's own spread across spots (scale-free: models trained on other inputs compare):
    the features the model reads (mean |difference| / mean sd of a dimension) and its predictions (mean |difference|
    / mean |deviation from the slide mean| per gene)."""
    from gnnst.graph.features import FeatureState
    from gnnst.inference import predict_slide, read_spot_table

    xy, bc, _ = read_spot_table(d["root"] / "S1_selection.tsv", slide_id="S1")
    kw = dict(slide_id="S1", mpp=200.0 / PITCH, cache_dir=str(d["cache"]), device="cpu", progress=False)
    a = predict_slide(model, d["root"] / "S1_HE.jpg", xy, bc, **kw)
    b = predict_slide(model, d["root"] / "S1_restained.jpg", xy, bc, **kw)
    fa, fb = (_model_features(model, p) for p in (a, b))
    feat = float(np.abs(fa - fb).mean() / fa.std(0).mean())
    pa, pb = np.asarray(a.X), np.asarray(b.X)
    return feat, float(np.abs(pa - pb).mean() / np.abs(pa - pa.mean(0)).mean())


def _model_features(model, pred) -> np.ndarray:
    """``[N, D]``: what the model read of a predicted slide (its embeddings, as stored beside the predictions,
    through the model's own normalisation)."""
    from torch_geometric.data import Data

    from gnnst.predictions import encoder_key

    return model.features(Data(x=torch.as_tensor(np.asarray(pred.obsm[encoder_key(model.encoder.name)]))))


@pytest.fixture(scope="module")
def plain(he_data):
    cfg = _cfg(he_data, "features.stain_norm=none")  # no correction (the default normalises the stain)
    return _train(he_data, _loaded(he_data, cfg), cfg, "plain")[1]


@pytest.mark.parametrize("features", [["features.slide_norm=standardize"], ["features.stain_norm=macenko"]],
                         ids=["slide_norm", "stain_norm"])
def test_a_restained_slide_is_predicted_closer_with_the_normalisation(he_data, plain, features):
    cfg_norm = _cfg(he_data, *features)
    _, norm = _train(he_data, _loaded(he_data, cfg_norm), cfg_norm, "norm_" + features[0].split("=")[0])
    assert norm.feature_norm.describe() != plain.feature_norm.describe()
    (feat_without, without), (feat_with, with_) = _restained(he_data, plain), _restained(he_data, norm)
    assert feat_with < 0.8 * feat_without, (feat_with, feat_without)
    assert with_ < without, (with_, without)


def test_a_held_out_slides_expression_never_reaches_features_or_model(he_data):
    import scipy.sparse as sp

    cfg = _cfg(he_data, "features.slide_norm=standardize", "features.stain_norm=reinhard", "features.stain_augment=1")
    loaded = _loaded(he_data, cfg)
    ts1, m1 = _train(he_data, loaded, cfg, "honest1")
    a = loaded.adatas["S1"]  # the held-out slide: its counts scrambled
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    a.X = np.random.default_rng(0).permutation(X[::-1] * 3 + 1)
    ts2, m2 = _train(he_data, loaded, cfg, "honest2")
    assert ts1.feature_norm.to_dict() == ts2.feature_norm.to_dict()  # stain reference, training statistics
    for s in SLIDES:
        np.testing.assert_array_equal(ts1.inputs[s].x.numpy(), ts2.inputs[s].x.numpy())
    for p, q in zip(m1.states, m2.states):
        for k in p:
            assert np.array_equal(p[k].numpy(), q[k].numpy()), k
    assert not np.array_equal(ts1.graphs["S1"].y.numpy(), ts2.graphs["S1"].y.numpy())  # the counts did change


def _in_fold_folder(t) -> bool:
    """Whether tensor ``t``'s data lies in a mapping of a fold's TargetFolder file (gnnst.graph.targets)."""
    import sys

    if not sys.platform.startswith("linux"):
        return True  # /proc/self/maps only
    addr = t.data_ptr()
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= addr < hi:
            return "gnnst_targets_" in line
    return False


def test_augmented_views_reach_training_only(he_data):
    from gnnst import keys

    cfg = _cfg(he_data, "features.stain_augment=2", "features.slide_norm=standardize")
    loaded = _loaded(he_data, cfg)
    ts, model = _train(he_data, loaded, cfg, "aug")
    for g in ts.train:
        views = getattr(g, keys.DATA_X_VIEWS)
        assert views.shape[:2] == (3, g.num_nodes) and np.array_equal(views[0].numpy(), g.x.numpy())
        assert not np.allclose(views[1].numpy(), views[0].numpy())  # the jitter changed the embeddings
        assert _in_fold_folder(views), "the views are not file-backed"  # a cohort's views are not in RAM
    assert all(getattr(g, keys.DATA_X_VIEWS, None) is None for g in ts.val)  # validation: view 0 only
    assert getattr(ts.inputs["S1"], keys.DATA_X_VIEWS, None) is None  # a held-out slide has no views
    assert "augment" not in str(model.feature_norm.to_dict())


def test_augmented_views_are_file_backed_without_slide_standardisation(he_data):
    """With features.stain_augment and no slide standardisation the fold's [V, N, D] views are held in its
    TargetFolder (file-backed like y), not in RAM."""
    from gnnst import keys
    from gnnst.train.prepare import prepare_training

    cfg = _cfg(he_data, "features.stain_augment=1", "features.slide_norm=none")
    ts = prepare_training(cfg, _loaded(he_data, cfg), ["S2", "S3"], ["S1"])
    for g in ts.train:
        views = getattr(g, keys.DATA_X_VIEWS)
        assert views.shape[0] == 2 and _in_fold_folder(views), "the views are not file-backed"
