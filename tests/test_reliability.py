"""gnnst.reliability: per-gene reliability, the ensemble spread's calibration, out-of-distribution scores; the
figures that score them (gnnst.metrics) and their place in the TrainedModel file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnnst.errors import GnnstError
from gnnst.reliability import Calibration, GeneReliability, OODReference, ensemble_sd, knn_distance, normal_z


def _clusters(seed: int, n: int = 60, d: int = 24, centre: np.ndarray | None = None, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    c = np.ones(d) if centre is None else centre
    return (c + spread * rng.normal(size=(n, d))).astype(np.float32)


# ------------------------------------------------------------------------------------ OOD
def test_ood_flags_what_training_never_showed_and_not_new_slides_of_the_same_kind():
    train = [_clusters(s) for s in range(3)]  # three training slides of one tissue
    ref = OODReference.build(train, k=5, quantile=0.99, cap=10_000, seed=0)
    assert ref.method == "leave-one-slide-out" and len(ref.features) == 180 and ref.features.dtype == np.float16
    held = ref.score(_clusters(7))  # a new slide of the same tissue
    assert ref.flag(held).mean() <= 0.1 and 0.5 < np.median(held) < 1.5  # 1 = a typical training spot
    other = np.zeros(24, np.float32)
    other[0] = 1.0  # another direction in feature space: another tissue, glass, pen
    far = ref.score(_clusters(8, n=10, centre=other * 3))
    assert ref.flag(far).all() and far.min() > 2 * ref.threshold


def test_ood_reference_cap_seed_and_single_slide():
    train = [_clusters(0, n=300), _clusters(1, n=300)]
    a = OODReference.build(train, k=5, quantile=0.99, cap=100, seed=3)
    b = OODReference.build(train, k=5, quantile=0.99, cap=100, seed=3)
    assert len(a.features) == 100 and a.n_train == 600 and set(np.unique(a.slides)) == {0, 1}
    np.testing.assert_array_equal(a.features, b.features)  # seeded subsample
    assert a.threshold == b.threshold
    one = OODReference.build([_clusters(0, n=40)], k=5, quantile=0.9, cap=100, seed=0)
    assert one.method == "leave-one-out"  # no other slide to leave out
    own = one.score(one.features.astype(np.float32))  # a reference spot's nearest neighbour is itself (distance 0)
    assert (own < np.median(own) * 10).all()
    with pytest.raises(GnnstError, match="at least 2 training spots"):
        OODReference.build([_clusters(0, n=1)], k=5, quantile=0.9, cap=10, seed=0)
    with pytest.raises(GnnstError, match="width"):
        one.score(np.zeros((3, 5), np.float32))


def test_ood_reference_from_slide_functions_keeps_only_the_sample():
    """Built from one function per slide (with the slides' sizes), the reference is the one built from the
    arrays, bit for bit; a slide none of whose spots is sampled is never computed; a wrong size is named."""
    train = [_clusters(0, n=300), _clusters(1, n=2), _clusters(2, n=200)]
    calls = []

    def lazy(i):
        def f():
            calls.append(i)
            return train[i]
        return f

    a = OODReference.build(train, k=3, quantile=0.99, cap=20, seed=1)  # seed 1 samples none of slide 1's 2 spots
    b = OODReference.build([lazy(i) for i in range(3)], sizes=[300, 2, 200], k=3, quantile=0.99, cap=20, seed=1)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.slides, b.slides)
    assert (a.threshold, a.norm, a.n_train) == (b.threshold, b.norm, b.n_train)
    assert sorted(calls) == sorted(set(b.slides.tolist())) and 1 not in calls  # each sampled slide once
    full = OODReference.build([lazy(i) for i in range(3)], sizes=[300, 2, 200], k=5, quantile=0.99, cap=1000, seed=0)
    arrays = OODReference.build(train, k=5, quantile=0.99, cap=1000, seed=0)
    np.testing.assert_array_equal(full.features, arrays.features)
    with pytest.raises(GnnstError, match="slide 0 has 300 feature rows, 301 were announced"):
        OODReference.build([lazy(0)], sizes=[301], k=5, quantile=0.99, cap=1000, seed=0)


def test_knn_distance_by_hand():
    ref = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)  # unit rows
    q = np.array([[1, 0]], np.float32)
    np.testing.assert_allclose(knn_distance(q, ref, 1), [0.0], atol=1e-7)
    np.testing.assert_allclose(knn_distance(q, ref, 2), [0.5], atol=1e-7)  # (0 + 1) / 2 cosine distances
    # leave-one-group-out: the query's own group is skipped
    np.testing.assert_allclose(knn_distance(q, ref, 1, query_group=np.array([0]), ref_group=np.array([0, 1, 1])),
                               [1.0], atol=1e-7)
    # chunking does not change the result
    rng = np.random.default_rng(0)
    big = rng.normal(size=(50, 4)).astype(np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    np.testing.assert_allclose(knn_distance(big, big, 3, chunk=7), knn_distance(big, big, 3), rtol=1e-6)


# ------------------------------------------------------------------------------------ spread
def test_ensemble_sd():
    assert ensemble_sd(None) is None and ensemble_sd(np.zeros((1, 3, 2))) is None
    m = np.array([[[1.0]], [[3.0]]])  # two members, one spot, one gene
    np.testing.assert_allclose(ensemble_sd(m), [[np.sqrt(2.0)]])  # ddof=1


def test_calibration_reaches_nominal_coverage_on_new_data_when_sd_is_right_up_to_a_factor():
    rng = np.random.default_rng(0)

    def draw(n):
        sd_true = rng.uniform(0.1, 2.0, size=(n, 5))
        return rng.normal(size=(n, 5)) * sd_true, sd_true / 3.0  # the members' spread is 3x too small

    err, sd = draw(4000)
    cal = Calibration.fit(err, np.zeros_like(err), sd, level=0.9, members=3)
    assert cal.z == pytest.approx(1.6449, abs=1e-3) and cal.scale == pytest.approx(3.0, rel=0.05)
    err2, sd2 = draw(4000)  # held-out values: the same law
    covered = np.abs(err2) <= cal.z * cal.scale * sd2
    assert covered.mean() == pytest.approx(0.9, abs=0.02)
    back = Calibration.from_dict(cal.to_dict())
    assert back == cal
    assert Calibration.fit(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)), level=0.9, members=2) is None
    with pytest.raises(GnnstError, match="interval level"):
        normal_z(1.0)


# ------------------------------------------------------------------------------------ per gene
def test_gene_reliability_from_cv_and_without():
    cv = {"genes": ["B", "A", "C"], "pcc_mean": [0.3, 0.5, None], "pcc_sd": [0.1, None, None], "n_slides": [2, 1, 0],
          "pcc_patient_disjoint": [None, 0.4, None]}
    r = GeneReliability.from_cv(cv, ["A", "B", "C", "D"], 0.3)
    np.testing.assert_allclose(r.cv_pcc, [0.5, 0.3, np.nan, np.nan])  # by name, panel order
    np.testing.assert_allclose(r.cv_pcc_sd, [np.nan, 0.1, np.nan, np.nan])
    np.testing.assert_allclose(r.cv_pcc_new_patient, [0.4, np.nan, np.nan, np.nan])
    assert list(r.reliable) == [True, True, False, False] and r.n_reliable == 2 and r.n_estimated == 2
    assert list(r.frame().columns) == ["gnnst_cv_pcc", "gnnst_cv_pcc_sd", "gnnst_cv_pcc_new_patient", "gnnst_reliable"]
    fold = GeneReliability.from_cv(None, ["A", "B"], 0.3, fold="patient_P1")
    assert np.isnan(fold.cv_pcc).all() and not fold.reliable.any() and fold.n_estimated == 0
    assert "fold model 'patient_P1'" in fold.note and "metrics.json" in fold.note
    assert "without cross-validation" in GeneReliability.from_cv(None, ["A"], 0.3).note
    with pytest.raises(GnnstError, match=r"\[-1, 1\]"):
        GeneReliability.from_cv(cv, ["A"], 1.5)


# ------------------------------------------------------------------------------------ figures
def test_reliability_scores_by_hand():
    from gnnst.metrics import reliability_scores, summarise_reliability

    y = np.zeros((5, 2))
    p = np.array([[0.1, 0.5], [0.2, 0.4], [0.3, 0.3], [0.4, 0.2], [0.5, 0.1]])
    sd = np.array([[1, 5], [2, 4], [3, 3], [4, 2], [5, 1.0]]) * 0.1  # gene 0 ranks the error, gene 1 too
    got = reliability_scores(y, p, sd, np.array([True, False, False, False, False]), scale=1.0, z=1.0)
    assert got["sd_error_spearman"] == pytest.approx(1.0) and got["sd_error_spearman_positive"] == 1.0
    assert got["interval_coverage"] == 1.0 and got["ood_fraction"] == pytest.approx(0.2)
    assert got["interval_halfwidth"] == pytest.approx(0.3)
    half = reliability_scores(y, p, sd, None, scale=0.5, z=1.0)  # |err| = sd: half the interval misses all
    assert half["interval_coverage"] == 0.0 and half["ood_fraction"] is None
    none = reliability_scores(y, p, None, None, scale=None, z=None)
    assert none["sd_error_spearman"] is None and none["interval_coverage"] is None
    s = summarise_reliability([got, half, none])
    assert s["interval_coverage"] == pytest.approx(0.5) and s["ood_fraction"] == pytest.approx(0.2) and s["slides"] == 3


# ------------------------------------------------------------------------------------ the model file
def test_model_file_carries_calibration_ood_reference_and_settings(tmp_path):
    from test_predictor import _toy_graph, make_model

    from gnnst.config import ReliabilityConfig
    from gnnst.predictor import TrainedModel

    tm = make_model()
    g = _toy_graph()
    tm.calibration = Calibration(scale=2.0, level=0.8, z=normal_z(0.8), n_values=10, members=2)
    tm.ood_reference = OODReference.build([tm.features(_toy_graph(40, seed=s)) for s in (1, 2)], k=3, quantile=0.95,
                                          cap=50, seed=0)
    tm.reliability = ReliabilityConfig(reliable_pcc=0.2)
    back = TrainedModel.load(tm.save(tmp_path / "model.pt"))
    assert back.calibration == tm.calibration and back.reliability.reliable_pcc == 0.2
    np.testing.assert_array_equal(back.ood_reference.features, tm.ood_reference.features)
    assert back.ood_reference.threshold == tm.ood_reference.threshold
    p = back.predict(g)
    np.testing.assert_allclose(p.ood_score, tm.ood_reference.score(g.x.numpy()), rtol=1e-6)
    np.testing.assert_array_equal(p.ood, p.ood_score > back.ood_reference.threshold)
    np.testing.assert_allclose(p.sd, p.members.std(0, ddof=1), rtol=1e-5)
    assert back.predict(g, ood=False).ood_score is None and back.predict(g, members=False).sd is None
    # a model file written before these fields existed loads, with none of them
    d = torch.load(tmp_path / "model.pt", weights_only=True)
    for k in ("calibration", "ood_reference", "reliability"):
        d.pop(k)
    old = TrainedModel.from_dict(d)
    assert old.calibration is None and old.ood_reference is None and old.reliability == ReliabilityConfig()
    assert old.predict(g).ood_score is None
    d["ood_reference"] = {"features": torch.zeros(3, 5), "slides": torch.zeros(3, dtype=torch.int32), "k": 1,
                          "quantile": 0.9, "norm": 1.0, "threshold": 1.0, "n_train": 3, "method": "leave-one-out"}
    with pytest.raises(GnnstError, match="'ood_reference' has features of width 5"):
        TrainedModel.from_dict(d)
