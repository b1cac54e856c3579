"""Build once, train many: a fold from the graph folder equals the fold from the raw slides."""

import copy
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gnnst.errors import GnnstError
from gnnst_testdata import untimed
from gnnst_tinyrun import TINY_RUN, tiny_dataset


def _cfg(ds, *extra):
    from gnnst.config import load_config

    return load_config(None, [f"data.manifest={ds['manifest']}", f"data.data_root={ds['root']}",
                              f"data.cache_dir={ds['cache']}", *TINY_RUN, *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny dataset, its slides read and embedded in memory, and a graph folder built from them."""
    from gnnst.graph.dataset import build_graphs, load_and_embed

    base = tmp_path_factory.mktemp("store")
    ds = tiny_dataset(base)
    for s in ("S1", "S2", "S3"):  # G11 detected in one spot of 20: not a candidate at 10 %
        _rare(ds["root"] / f"{s}.tsv.gz", "G11")
    extra = ["expression.candidate_fraction=0.1"]
    build_graphs(_cfg(ds, *extra), base / "graphs", progress=False)
    return {**ds, "graphs": base / "graphs", "extra": extra, "loaded": load_and_embed(_cfg(ds, *extra), progress=False)}


def _rare(path, gene):
    import gzip

    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    col = lines[0].split("\t").index(gene)
    for i in range(2, len(lines)):
        cells = lines[i].split("\t")
        cells[col] = "0"
        lines[i] = "\t".join(cells)
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def test_normalise_counts_is_scanpys_bit_for_bit():
    import anndata as ad
    import scanpy as sc

    from gnnst.config import ExpressionConfig
    from gnnst.data.expression import SlideCounts

    rng = np.random.default_rng(0)
    X = rng.poisson(0.7, size=(40, 30)).astype(np.float32)
    X[3] = 0  # a spot without counts stays unscaled
    a = ad.AnnData(X=sp.csr_matrix(X))
    a.obs["slide_id"] = "S"
    for target in (1e4, None):
        cfg = ExpressionConfig(target_sum=target)
        ref = a.copy()
        sc.pp.normalize_total(ref, target_sum=target)
        sc.pp.log1p(ref)
        cols = np.array([0, 5, 7, 29])
        c = SlideCounts.from_anndata(a, [f"{i}" for i in cols])  # a subset of genes, normalised over all
        got = c.normalised(c.columns([str(i) for i in cols]), cfg)
        np.testing.assert_array_equal(got, ref.X.toarray()[:, cols])


def test_the_folder_stores_the_candidate_genes_and_source_checksums(built):
    from gnnst.data.expression import SlideCounts, candidate_genes
    from gnnst.graph.store import COUNTS, GraphDataset

    ds = GraphDataset(built["graphs"])
    loaded = built["loaded"]
    cands = candidate_genes([SlideCounts.from_anndata(loaded.adatas[s]) for s in loaded.slide_ids], 0.1)
    assert 0 < len(cands) < 12  # the threshold drops some genes: the test sees the filter
    for s in ds.slide_ids:
        d = ds[s]
        assert sorted(d[COUNTS]["genes"]) == sorted(cands)
        full = SlideCounts.from_anndata(loaded.adatas[s])
        assert np.array_equal(ds.slide_counts(s).totals, full.totals)  # totals over every gene, not the stored ones
        info = ds.info["slides"][s]
        assert set(info["sources"]) == {"counts", "spots", "image"}
        assert all(len(v["sha256"]) == 64 for v in info["sources"].values())
    assert "G11" not in cands and "G11" in loaded.adatas["S1"].var_names
    assert ds.info["format"] == 2 and ds.info["num_candidate_genes"] == len(cands)


@pytest.mark.parametrize("k", [4, 3])  # 3: the edges are rebuilt from the stored positions
def test_fold_from_graph_folder_equals_fold_from_raw_slides(built, k):
    from gnnst.graph.store import GraphDataset
    from gnnst.train.prepare import prepare_training

    cfg = _cfg(built, *built["extra"], f"graph.k={k}")
    raw = prepare_training(cfg, built["loaded"], ["S1", "S2"], ["S3"])
    folder = prepare_training(cfg, GraphDataset(built["graphs"]), ["S1", "S2"], ["S3"])
    assert folder.panel.to_dict() == raw.panel.to_dict()
    np.testing.assert_array_equal(folder.scaler.mean, raw.scaler.mean)
    np.testing.assert_array_equal(folder.scaler.std, raw.scaler.std)
    for s in ("S1", "S2", "S3"):
        a, b = folder.graphs[s], raw.graphs[s]
        for key in ("x", "y", "pos", "edge_index", "edge_attr"):
            assert torch.equal(a[key], b[key]), (s, key)
    for a, b in zip(folder.val_masks, raw.val_masks):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stain_norm", ["none", "macenko"])
def test_train_from_graphs_without_raw_slides_gives_the_metrics_of_raw_slides(built, tmp_path, stain_norm):
    """Move the raw data away after building: `gnnst train --graphs` still trains, to the same metrics as
    cross-validation over the slides read in memory. Without stain normalisation nothing of the raw slides
    is read; with it (the default) only their images are, which stay."""
    from gnnst.cli import main
    from gnnst.eval.crossval import run_crossval

    run = ["eval.figures=false", "eval.final_model=false", "eval.only_folds=[S3]", f"features.stain_norm={stain_norm}"]
    run_crossval(_cfg(built, *built["extra"], *run), tmp_path / "raw", loaded=built["loaded"], progress=False)
    root, moved = built["root"], built["root"].with_name("moved")
    keep = [] if stain_norm == "none" else sorted(root.glob("*_HE.jpg"))  # the images the stain is read from
    root.rename(moved)
    root.mkdir()
    for f in keep:
        (moved / f.name).rename(f)
    try:
        assert main(["train", "--graphs", str(built["graphs"]), "--out", str(tmp_path / "g"), "--quiet",
                     *TINY_RUN, *built["extra"], *run]) == 0
    finally:
        for f in keep:
            f.rename(moved / f.name)
        root.rmdir()
        moved.rename(root)
    a = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    b = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert a["folds"] and untimed(a["folds"]) == untimed(b["folds"])
    assert "pcc_heg_per_slide" in json.dumps(a["folds"])


def test_stain_normalised_folds_from_the_folder_equal_those_of_raw_slides(built, monkeypatch):
    """... and the re-embedded x of every slide is held file-backed with the targets, read slide by slide."""
    from gnnst.graph.store import GraphDataset
    from gnnst.graph.targets import TargetFolder
    from gnnst.train.prepare import prepare_training

    held, hold = [], TargetFolder.hold
    monkeypatch.setattr(TargetFolder, "hold", lambda self, a: held.append(np.shape(a)) or hold(self, a))
    cfg = _cfg(built, *built["extra"], "features.stain_norm=macenko")
    raw = prepare_training(cfg, built["loaded"], ["S1", "S2"], ["S3"])
    folder = prepare_training(cfg, GraphDataset(built["graphs"]), ["S1", "S2"], ["S3"])
    for ts in (raw, folder):
        assert all(tuple(ts.graphs[s].x.shape) in held for s in ("S1", "S2", "S3"))
    assert folder.feature_norm.to_dict() == raw.feature_norm.to_dict()  # the same reference stain
    plain = prepare_training(_cfg(built, *built["extra"], "features.stain_norm=none"), built["loaded"], ["S1", "S2"],
                             ["S3"])
    for s in ("S1", "S2", "S3"):
        assert torch.equal(folder.inputs[s].x, raw.inputs[s].x), s
        assert not torch.allclose(folder.inputs[s].x.float(), plain.inputs[s].x.float()), s  # re-embedded


def test_a_missing_image_is_named_before_any_work_when_the_stain_is_normalised(built, tmp_path, capsys):
    from gnnst.cli import main

    image = built["root"] / "S2_HE.jpg"
    image.rename(image.with_suffix(".moved"))
    try:
        rc = main(["train", "--graphs", str(built["graphs"]), "--out", str(tmp_path / "g"), "--quiet", *TINY_RUN,
                   *built["extra"], "features.stain_norm=macenko"])
    finally:
        image.with_suffix(".moved").rename(image)
    err = capsys.readouterr().err
    assert rc != 0 and "slide 'S2': its image" in err and "S2_HE.jpg" in err and "features.stain_norm=none" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g").exists()  # nothing written


def test_a_run_config_that_contradicts_the_folder_is_refused(built):
    from gnnst.graph.store import GraphDataset

    ds = GraphDataset(built["graphs"])
    ds.check_config(_cfg(built, *built["extra"]))
    with pytest.raises(GnnstError, match=r"config key 'graph.storage': 'float16' differs from 'auto'"):
        ds.check_config(_cfg(built, *built["extra"], "graph.storage=float16"))
    with pytest.raises(GnnstError, match=r"config key 'expression.candidate_fraction': 0.01 differs from 0.1"):
        ds.check_config(_cfg(built, "expression.candidate_fraction=0.01"))
    with pytest.raises(GnnstError, match=r"'expression.min_spot_fraction': 0.05 is below expression.candidate_fraction"):
        _cfg(built, *built["extra"], "expression.min_spot_fraction=0.05")  # at load: panels only among candidates


def test_an_old_folder_is_refused_with_the_rebuild_command(tmp_path):
    from gnnst.graph.store import GraphDataset

    (tmp_path / "dataset.json").write_text(json.dumps({"gnnst_version": "0.1", "slides": {}}))
    with pytest.raises(GnnstError, match=r"format 1 .* rebuild it with `gnnst build-graphs"):
        GraphDataset(tmp_path)


def test_train_config_builds_the_folder_once_and_reuses_it(tmp_path, caplog):
    import logging

    from gnnst.config import load_config
    from gnnst.graph.dataset import ensure_dataset

    ds = tiny_dataset(tmp_path)
    cfg = load_config(None, [f"data.manifest={ds['manifest']}", f"data.data_root={ds['root']}",
                             f"data.cache_dir={ds['cache']}", *TINY_RUN])
    first = ensure_dataset(cfg, progress=False)
    with caplog.at_level(logging.INFO, logger="gnnst"):
        again = ensure_dataset(cfg, progress=False)
    assert again.root == first.root and "reusing" in caplog.text


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_file_backed_targets_give_batches_the_targets_of_in_memory_ones(built, storage):
    """The fold's targets are file-backed (prepare_training), yet the scaler and every batch's ``y`` equal,
    bit for bit, those of the in-memory arrays made as before (one concatenated fit, a standardised copy)."""
    from gnnst.graph.dataset import make_graphs
    from gnnst.graph.sampler import SubgraphLoader
    from gnnst.predictor import TargetScaler
    from gnnst.train.prepare import prepare_training

    cfg = _cfg(built, *built["extra"], f"graph.storage={storage}")
    ts = prepare_training(cfg, built["loaded"], ["S1", "S2"], ["S3"])
    mem = make_graphs(built["loaded"], cfg, ts.panel, ["S1", "S2", "S3"])  # in memory, as before
    ys = [mem[s].y.numpy() for s in ts.train_slides]
    ref = TargetScaler.fit(np.concatenate([y[~m] for y, m in zip(ys, ts.val_masks)]))
    np.testing.assert_array_equal(ts.scaler.mean, ref.mean)
    np.testing.assert_array_equal(ts.scaler.std, ref.std)
    for s in ("S1", "S2", "S3"):
        assert torch.equal(ts.graphs[s].y, mem[s].y) and ts.graphs[s].y.dtype == getattr(torch, storage)
    old = [copy.copy(g) for g in ts.train]  # the same training parts (node_mask), y made as before
    for g, y in zip(old, ys):
        g.y = torch.from_numpy(ref.transform(y).astype(y.dtype))  # the standardised copy made before
    new_loader, old_loader = (SubgraphLoader(gs, batch_nodes=16, num_hops=2, shuffle=True, seed=3) for gs in (ts.train, old))
    n = 0
    for a, b in zip(new_loader, old_loader):
        assert a.y.dtype == torch.float32 and torch.equal(a.y, b.y)
        n += 1
    assert n == len(old_loader) > 1
    for g, v in zip(ts.train, ts.val):
        assert v.y is g.y  # one standardised array per slide, shared by the training part and validation


@pytest.mark.parametrize("slide_norm", ["none", "standardize"])
def test_prepare_training_leaves_its_targets_file_backed_and_no_files(built, tmp_path, monkeypatch, slide_norm):
    """Every y of a fold is a mapping of an unlinked file in the fold's folder (not process memory), and the
    folder is gone once the fold is made; with features.slide_norm: standardize, so is every input x."""
    import sys

    from gnnst.train.prepare import prepare_training

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    ts = prepare_training(_cfg(built, *built["extra"], f"features.slide_norm={slide_norm}"), built["loaded"],
                          ["S1", "S2"], ["S3"])
    assert list(tmp_path.iterdir()) == []
    maps = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
    assert all(line.rstrip().endswith("(deleted)") for line in maps)
    mapped = {int(line.split()[0].split("-")[0], 16) for line in maps}
    for g in [*ts.graphs.values(), *ts.train]:
        page = g.y.data_ptr() // 4096 * 4096
        assert page in mapped, "y is not file-backed"
    if slide_norm == "standardize":  # the standardised x of every slide is held the same way, not in RAM
        for g in [*ts.inputs.values(), *ts.train, *ts.val]:
            assert g.x.data_ptr() // 4096 * 4096 in mapped, "the standardised x is not file-backed"
