"""A held-out slide's expression is used for scoring only: changing it changes no part of the fold's model
(spread scale, OOD reference, weights, blend) nor its predictions, only the reliability figures."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from gnnst.cli import main
from gnnst_testdata import write_legacy_slide, write_manifest

TINY = ["train.epochs=2", "train.num_threads=1", "encoder.num_threads=1", "eval.figures=false", "train.ensemble=2",
        "model.hidden=32", "model.proj_dim=16", "model.heads=2", "expression.n_top_expressed=6",
        "expression.n_top_variable=6", "eval.n_heg=3", "eval.n_hvg=3", "train.val_fraction=0.25",
        "train.batch_nodes=16", "eval.baselines=[]", "eval.final_model=false", "eval.only_folds=[S1]"]


def test_held_out_expression_changes_the_scores_not_the_model(tmp_path):
    import anndata as ad

    from gnnst.predictor import TrainedModel

    root = tmp_path / "data"
    for i, s in enumerate(["S1", "S2", "S3"]):
        write_legacy_slide(root, s, seed=i, grid=(5, 4), image_size=(260, 220))
    m = write_manifest(tmp_path / "m.yaml", {"S1": "P1", "S2": "P2", "S3": "P3"})
    args = ["--manifest", str(m), "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--quiet", *TINY]
    assert main(["train", "--out", str(tmp_path / "a"), *args]) == 0
    path = root / "S1.tsv.gz"  # the held-out slide's counts, shuffled across its spots
    with gzip.open(path, "rt") as f:
        head, *rows = f.read().splitlines()
    order = np.random.default_rng(5).permutation(len(rows))
    names = [r.split("\t", 1)[0] for r in rows]
    values = [rows[j].split("\t", 1)[1] for j in order]
    with gzip.open(path, "wt") as f:
        f.write("\n".join([head] + [f"{n}\t{v}" for n, v in zip(names, values)]) + "\n")
    assert main(["train", "--out", str(tmp_path / "b"), *args]) == 0
    a, b = (TrainedModel.load(tmp_path / r / "folds" / "patient_P1" / "model.pt") for r in "ab")
    # equal up to float rounding: a second training in one process picks other CPU kernels (~1e-6 relative)
    assert a.calibration.scale == pytest.approx(b.calibration.scale, rel=1e-4) and a.blend_alpha == b.blend_alpha
    np.testing.assert_array_equal(a.ood_reference.features, b.ood_reference.features)  # from the images alone
    assert a.ood_reference.threshold == b.ood_reference.threshold
    for sa, sb in zip(a.states, b.states):
        for k in sa:
            np.testing.assert_allclose(sa[k].numpy(), sb[k].numpy(), rtol=1e-3, atol=1e-5, err_msg=k)
    pa, pb = (ad.read_h5ad(tmp_path / r / "predictions" / "S1.h5ad") for r in "ab")
    np.testing.assert_allclose(pa.layers["gnnst_pred"], pb.layers["gnnst_pred"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pa.layers["gnnst_sd"], pb.layers["gnnst_sd"], rtol=1e-2, atol=1e-5)
    np.testing.assert_array_equal(pa.obs["gnnst_ood_score"], pb.obs["gnnst_ood_score"])
    assert not np.allclose(pa.X, pb.X)  # the measurement did change
    ra, rb = (json.loads((tmp_path / r / "metrics.json").read_text())["reliability"]["per_slide"]["S1"] for r in "ab")
    assert ra["ood_fraction"] == rb["ood_fraction"]
    assert abs(ra["sd_error_spearman"] - rb["sd_error_spearman"]) > 1e-3  # scored against the measurement
