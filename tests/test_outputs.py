"""Output folders (gnnst/outputs.py): paths checked before work; a run folder holds one run of one config.

The end-to-end tests train tiny runs (1 epoch, 1 model per fold, a few seconds each).
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from gnnst.cli import main
from gnnst.errors import GnnstError
from gnnst_tinyrun import data_args, tiny_dataset

TINY = ["train.epochs=1", "train.num_threads=1", "encoder.num_threads=1", "train.ensemble=1", "model.hidden=16",
        "model.proj_dim=8", "model.heads=2", "expression.n_top_expressed=6", "expression.n_top_variable=6",
        "eval.n_heg=3", "eval.n_hvg=3", "train.val_fraction=0.25", "train.batch_nodes=16", "graph.k=4",
        "eval.baselines=[]", "eval.figures=false", "eval.final_model=false"]


def strict_json(path):
    """``path`` parsed as RFC 8259 JSON (``NaN``/``Infinity`` refused)."""
    def refuse(name):
        raise AssertionError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------------------ output paths
def test_output_paths_checked_without_creating_anything(tmp_path):
    from gnnst.outputs import check_output_dir, check_output_file

    f = tmp_path / "f.txt"
    f.write_text("x")
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # may be created later
    assert not (tmp_path / "a").exists()
    with pytest.raises(GnnstError, match=r"--out .*f\.txt: exists and is a file"):
        check_output_dir(f)
    with pytest.raises(GnnstError, match=r"--run-out .*f\.txt/x: cannot be created \(.*f\.txt is a file"):
        check_output_dir(f / "x", flag="--run-out")
    with pytest.raises(GnnstError, match=r"is a folder; give a file name"):
        check_output_file(tmp_path, suffix=".h5ad")
    with pytest.raises(GnnstError, match=r"--out must end in \.h5ad"):
        check_output_file(tmp_path / "p.csv", suffix=".h5ad")
    assert check_output_file(f) == f  # an existing file is replaced (atomically) by its writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not apply to root (test_fault_injection uses /proc)")
def test_read_only_folder_refused(tmp_path):
    from gnnst.outputs import check_output_dir, check_output_file

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(GnnstError, match=r"cannot write here .*Permission denied"):
            check_output_dir(ro / "new" / "deeper")
        with pytest.raises(GnnstError, match=r"cannot write here"):
            check_output_file(ro / "p.h5ad")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------ run folder rules
def _cfg(*over):
    from gnnst.config import load_config

    return load_config(None, list(over))


def test_result_neutral_keys_exist_and_say_why():
    from gnnst.config import RESULT_NEUTRAL, config_to_dict, flat_config

    keys = flat_config(config_to_dict(_cfg()))
    for k, why in RESULT_NEUTRAL.items():
        assert k in keys, k
        assert len(why) > 10
    for k in ("train.device", "encoder.device", "train.amp", "train.lr", "graph.k", "data.manifest", "seed"):
        assert k not in RESULT_NEUTRAL  # these change results


def test_config_diff_names_every_changed_key():
    from gnnst.config import config_diff, config_to_dict

    a = config_to_dict(_cfg())
    b = config_to_dict(_cfg("train.lr=0.002", "graph.k=8", "eval.baselines=[ridge]"))
    assert config_diff(a, a) == []
    assert config_diff(a, b) == ["eval.baselines", "graph.k", "train.lr"]
    del a["train"]["amp"]  # a key a config.yaml of another version lacks
    assert "train.amp" in config_diff(a, b)


def test_run_folder_rules(tmp_path, caplog):
    from gnnst.config import dump_config
    from gnnst.outputs import ABLATION, TRAIN_RUN, RunFolder

    cfg = _cfg()
    run = tmp_path / "run"
    assert RunFolder(run, TRAIN_RUN, cfg).resume is False and not run.exists()  # checks only
    rf = RunFolder(run, TRAIN_RUN, cfg, resume=True)  # nothing to resume: a new run
    assert rf.resume is False
    rf.begin()
    assert (run / "config.yaml").is_file()
    (run / "folds" / "f1").mkdir(parents=True)
    with pytest.raises(GnnstError, match="already holds a train run"):
        RunFolder(run, TRAIN_RUN, cfg)
    # resume: keys that do not change results may differ (and are logged); others are refused
    with caplog.at_level(logging.INFO, logger="gnnst"):
        assert RunFolder(run, TRAIN_RUN, _cfg("train.num_threads=3", "eval.figures=false"), resume=True).resume
    assert "eval.figures, train.num_threads" in caplog.text
    with pytest.raises(GnnstError, match=r"another config \(model.hidden: 256 -> 32; train.amp: true -> false\)"):
        RunFolder(run, TRAIN_RUN, _cfg("train.amp=false", "model.hidden=32"), resume=True)
    with pytest.raises(GnnstError, match=r"and 1 more"):
        RunFolder(run, TRAIN_RUN, _cfg("seed=1", "graph.k=3", "train.lr=0.1", "train.epochs=2", "model.dropout=0"),
                  resume=True)
    # overwrite: only gnnst's entries go, and only once begin() is called
    (run / ".metrics.json.abc.tmp").write_text("")
    rf = RunFolder(run, TRAIN_RUN, _cfg("train.lr=0.1"), overwrite=True)
    assert (run / "folds" / "f1").is_dir()
    rf.begin()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert "lr: 0.1" in (run / "config.yaml").read_text()
    (run / "mine.txt").write_text("user file")
    with pytest.raises(GnnstError, match="also holds 'mine.txt'"):
        RunFolder(run, TRAIN_RUN, cfg, overwrite=True)
    # a folder of another command is never taken for this one's
    dump_config(cfg, tmp_path / "abl" / "config.yaml")
    (tmp_path / "abl" / "settings").mkdir()
    with pytest.raises(GnnstError, match=r"holds an ablation \(of `gnnst ablate`\), not a train run"):
        RunFolder(tmp_path / "abl", TRAIN_RUN, cfg, resume=True)
    assert RunFolder(tmp_path / "abl", ABLATION, cfg, resume=True).resume
    # a partial run without its config cannot be resumed
    (tmp_path / "part" / "folds").mkdir(parents=True)
    with pytest.raises(GnnstError, match="no config.yaml, so its config is unknown"):
        RunFolder(tmp_path / "part", TRAIN_RUN, cfg, resume=True)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture
def ds(tmp_path):
    return {**tiny_dataset(tmp_path), "tmp": tmp_path}


def _train(ds, out, *extra):
    flags = [e for e in extra if e.startswith("--")]
    return main(["train", *data_args(ds), "--out", str(out), "--quiet", *flags, *TINY,
                 *[e for e in extra if e not in flags]])


def test_a_run_never_mixes_two_configs(ds, capsys):
    out = ds["tmp"] / "run"
    assert _train(ds, out, "eval.only_folds=[S1, S2]") == 0
    first = {p: (out / p).read_bytes() for p in ("config.yaml", "metrics.json")}
    assert sorted(p.name for p in (out / "folds").iterdir()) == ["patient_P1", "patient_P2"]
    # a new run into it: refused; --resume with a change that changes results: refused, nothing rewritten
    assert _train(ds, out, "eval.only_folds=[S3]") == 2
    assert "already holds a train run" in capsys.readouterr().err
    assert _train(ds, out, "--resume", "train.lr=0.002", "eval.only_folds=[S1, S2]") == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "train.lr: 0.001 -> 0.002" in err
    assert {p: (out / p).read_bytes() for p in first} == first
    # --resume where only keys that do not change results differ: the finished folds are reused as they are
    res = (out / "folds" / "patient_P1" / "result.json").read_bytes()
    assert _train(ds, out, "--resume", "eval.only_folds=[S1, S2, S3]", "train.num_threads=2") == 0
    assert "fold patient_P1: already done" in capsys.readouterr().err
    assert (out / "folds" / "patient_P1" / "result.json").read_bytes() == res
    m = strict_json(out / "metrics.json")
    assert [f["name"] for f in m["folds"]] == ["patient_P1", "patient_P2", "patient_P3"]
    assert m["config"]["train"]["num_threads"] == 2
    # --overwrite: the earlier run's folds, predictions and metrics go before the new run writes
    assert _train(ds, out, "--overwrite", "eval.only_folds=[S3]", "train.lr=0.002") == 0
    assert sorted(p.name for p in (out / "folds").iterdir()) == ["patient_P3"]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["S3.h5ad"]
    m = strict_json(out / "metrics.json")
    assert [f["name"] for f in m["folds"]] == ["patient_P3"] and m["config"]["train"]["lr"] == 0.002
    assert main(["export", "--run", str(out), "--out", str(ds["tmp"] / "exp"), "--no-image"]) == 0
    assert sorted(p.name for p in (ds["tmp"] / "exp").iterdir()) == ["S3.h5ad"]
    # every JSON of the run is strict JSON; the log holds what was logged before the folder existed
    for p in [out / "metrics.json", *out.glob("folds/*/result.json")]:
        strict_json(p)
    log = (out / "train.log").read_text()
    assert "--overwrite: removing the earlier run" in log and "fold 1/1 patient_P3" in log


def test_failed_run_leaves_nothing_and_checks_k_before_the_encoder(ds, capsys, monkeypatch):
    import gnnst.data.encoders

    def no_encoder(*a, **k):
        raise AssertionError("the encoder was loaded before graph.k was checked")

    monkeypatch.setattr(gnnst.data.encoders, "create_encoder", no_encoder)
    out = ds["tmp"] / "run"
    assert _train(ds, out, "graph.k=20") == 2
    assert "slide 'S1' has 20 spots, too few for graph.k=20" in capsys.readouterr().err
    assert not out.exists()  # not even train.log


def test_rebuilt_graph_folder_holds_only_the_new_build(ds, capsys):
    out = ds["tmp"] / "graphs"
    build = ["build-graphs", *data_args(ds), "--out", str(out), "--quiet", "graph.k=4", "encoder.num_threads=1"]
    assert main(build) == 0
    assert sorted(p.name for p in out.glob("*.pt")) == ["S1.pt", "S2.pt", "S3.pt"]
    assert main(build + ["data.slides=[S1, S2]"]) == 2
    assert "already holds a graph folder" in capsys.readouterr().err
    assert main(build[:-2] + ["--overwrite", "graph.k=4", "encoder.num_threads=1", "data.slides=[S1, S2]"]) == 0
    assert sorted(p.name for p in out.glob("*.pt")) == ["S1.pt", "S2.pt"]  # no stale S3
    assert list(strict_json(out / "dataset.json")["slides"]) == ["S1", "S2"]
    log = (out / "build.log").read_text()
    assert "--overwrite: removing the earlier run" in log and "built 2 graphs" in log
