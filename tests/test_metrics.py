"""gnnst.metrics: the definitions of every reported figure, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from gnnst.metrics import (ALL_KEYS, SUMMARY_COLUMNS, FoldPredictions, MetricSet, hvg_by_variance, pearson_per_gene,
                           pooled_pcc, report_subsets, slide_score_key, summarise)


def _fold(name, genes, subsets, y, p, disjoint=False):
    return FoldPredictions(name, genes, {k: list(v) for k, v in subsets.items()}, y, p, disjoint)


def test_pooled_is_across_folds_on_the_genes_in_every_folds_subset():
    # two folds, one held-out slide each, 3 spots; fold A's HEG are {a, b}, fold B's {b, c}: only b is pooled
    yA = np.array([[0.0, 1.0, 5.0], [1.0, 2.0, 5.0], [2.0, 3.0, 5.0]])
    pA = np.array([[0.0, 1.0, 0.0], [1.0, 2.0, 1.0], [2.0, 4.0, 0.0]])
    yB = np.array([[9.0, 10.0, 0.0], [9.0, 11.0, 1.0], [9.0, 12.0, 2.0]])
    pB = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    genes = ["a", "b", "c"]
    A = _fold("A", genes, {"heg": ["a", "b"], "hvg": ["a"], "all": genes}, {"S1": yA}, {"S1": pA})
    B = _fold("B", genes, {"heg": ["b", "c"], "hvg": ["c"], "all": genes}, {"S2": yB}, {"S2": pB})
    r, n = pooled_pcc([A, B], "heg")
    # gene b over the six held-out spots of both folds, concatenated
    want = np.corrcoef(np.r_[yA[:, 1], yB[:, 1]], np.r_[pA[:, 1], pB[:, 1]])[0, 1]
    assert n == 1 and r == pytest.approx(want)
    assert pooled_pcc([A, B], "hvg") == (pytest.approx(np.nan, nan_ok=True), 0)  # no gene in every subset
    s = summarise([A, B])
    assert s["n_genes_pooled"] == {"heg": 1, "hvg": 0, "all": 3} and s["slides"] == 2
    # per slide: per gene within each slide, mean over the subset's genes (constant ones left out), then slides
    rA = pearson_per_gene(yA, pA)  # gene c is constant on S1: NaN, left out
    rB = pearson_per_gene(yB, pB)  # gene a is constant on S2 (both sides)
    assert np.isnan(rA[2]) and np.isnan(rB[0])
    assert s["pcc_heg_per_slide"] == pytest.approx(np.mean([np.mean(rA[[0, 1]]), np.mean(rB[[1, 2]])]))
    assert s["pcc_all_per_slide"] == pytest.approx(np.mean([np.mean(rA[[0, 1]]), np.mean(rB[[1, 2]])]))
    assert s["mse"] == pytest.approx(np.mean([((yA - pA) ** 2).mean(), ((yB - pB) ** 2).mean()]))
    assert s["mae"] == pytest.approx(np.mean([np.abs(yA - pA).mean(), np.abs(yB - pB).mean()]))
    # with one slide per fold, pooled over ONE fold is that slide's per-gene PCC, not the cross-fold value
    assert summarise([A])["pcc_heg_pooled"] == pytest.approx(np.mean(rA[[0, 1]]))
    assert set(ALL_KEYS) <= set(s)


def test_a_constant_prediction_has_no_correlation():
    y = np.random.default_rng(0).normal(size=(10, 2))
    p = np.tile(np.float32([0.1234567, 3.3]), (10, 1))  # float rounding of its mean leaves tiny residues
    assert np.isnan(pearson_per_gene(y, p)).all()


def test_hvg_by_variance_and_the_subsets():
    y = np.array([[0.0, 0.0, 1.0, 5.0], [0.0, 2.0, 1.0, 5.0], [0.0, 4.0, 3.0, 5.0]])
    genes = ["g0", "g1", "g2", "g3"]
    assert hvg_by_variance(y, genes, 2) == ["g1", "g2"]
    assert hvg_by_variance(y, genes, 4) == ["g1", "g2", "g0", "g3"]  # ties keep panel order
    ms = MetricSet(n_heg=2, n_hvg=1, hvg="variance")
    sub = report_subsets(genes, ["g3", "g2", "g1", "g0"], ["g0", "g3"], y, ms)
    assert sub == {"heg": ["g3", "g2"], "hvg": ["g1"], "all": genes}
    sub = report_subsets(genes, ["g3", "g2", "g1", "g0"], ["g0", "g3"], None, MetricSet(2, 1, "seurat"))
    assert sub["hvg"] == ["g0"]
    with pytest.raises(ValueError, match="variance"):
        report_subsets(genes, genes, genes, None, ms)


def test_labels_and_definitions_come_from_one_table():
    ms = MetricSet(n_heg=20, n_hvg=30, hvg="variance")
    assert ms.label("pcc_heg_per_slide") == "PCC HEG20/slide" and ms.label("pcc_hvg_pooled") == "PCC HVG30 pooled"
    assert ms.label("mse") == "MSE"
    d = ms.describe()
    assert set(d["metrics"]) == set(ALL_KEYS) and set(SUMMARY_COLUMNS) <= set(ALL_KEYS)
    assert "highest variance" in d["subsets"]["hvg"]["selection"] and d["hvg"] == "variance"
    assert "seurat" in MetricSet().subset_definition("hvg")
    assert slide_score_key("pcc_all_per_slide") == "pcc_all" and slide_score_key("mae") == "mae"
    with pytest.raises(KeyError):
        slide_score_key("pcc_heg_pooled")
    with pytest.raises(KeyError, match="unknown metric key"):
        ms.label("pcc_heg50_per_slide")


def test_metrics_json_is_strict_json_with_a_reason_for_each_null(tmp_path):
    """A figure that is not a number (here: a constant prediction, so no PCC) is written as null, and
    nulls[<path>] says why; the file is RFC 8259 JSON. A fold's result.json read back and written again
    into metrics.json gives the same form (its nulls map moves to the top)."""
    import json

    from gnnst.io import atomic_write_json
    from gnnst.metrics import NULLS, summarise

    y = np.arange(12, dtype=np.float32).reshape(4, 3)
    genes = ["a", "b", "c"]
    fp = FoldPredictions("f1", genes, {"heg": genes, "hvg": ["a"], "all": genes}, {"S1": y},
                         {"S1": np.ones_like(y)})
    summary = summarise([fp])
    assert np.isnan(summary["pcc_heg_per_slide"])
    result = {"name": "f1", "per_slide": fp.slide_scores(), "summary": summary, "cpu_seconds": float("inf")}
    atomic_write_json(tmp_path / "result.json", result)

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    back = json.loads((tmp_path / "result.json").read_text(), parse_constant=refuse)
    assert back["summary"]["pcc_heg_per_slide"] is None and back["per_slide"]["S1"]["pcc_hvg"] is None
    assert back["per_slide"]["S1"]["pcc_per_gene"] == [None, None, None]  # per gene: null without an entry
    assert "constant is undefined" in back[NULLS]["summary.pcc_heg_per_slide"]
    assert "on this slide" in back[NULLS]["per_slide.S1.pcc_hvg"]
    assert back[NULLS]["cpu_seconds"] == "not measured"
    assert back["summary"]["mse"] == pytest.approx(summary["mse"])
    atomic_write_json(tmp_path / "metrics.json", {"folds": [back], "summary": summary})
    top = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert NULLS not in top["folds"][0]
    assert top[NULLS]["folds[0].summary.pcc_heg_per_slide"] == back[NULLS]["summary.pcc_heg_per_slide"]
    assert top[NULLS]["summary.pcc_heg_per_slide"] == back[NULLS]["summary.pcc_heg_per_slide"]
