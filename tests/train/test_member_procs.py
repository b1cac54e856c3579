"""Ensemble members trained side by side in forked CPU processes (``train.member_procs``)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from gnnst_testdata import untimed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="members are forked on Linux only")


def test_members_side_by_side_equal_one_at_a_time(tmp_path):
    """Three members in three forked processes: the same metrics and bit-identical members as one after the
    other at the same thread count; the hand-over files are gone and the wall time is recorded."""
    from gnnst.cli import main
    from gnnst_tinyrun import TINY_RUN, data_args, tiny_dataset

    run = ["train", *data_args(tiny_dataset(tmp_path)), "--quiet", *TINY_RUN, "train.ensemble=3",
           "eval.only_folds=[S3]", "eval.figures=false", "eval.final_model=false", "train.device=cpu"]
    assert main([*run, "train.member_procs=1", "--out", str(tmp_path / "one")]) == 0
    assert main([*run, "train.member_procs=3", "--out", str(tmp_path / "side")]) == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "side"))
    for key in ("summary", "folds", "baselines"):
        assert untimed(a[key]) == untimed(b[key]), key
    fold = "folds/patient_P3"
    s1, s2 = (torch.load(tmp_path / r / fold / "model.pt", weights_only=True)["states"] for r in ("one", "side"))
    assert len(s1) == len(s2) == 3
    for x, y in zip(s1, s2):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert not list((tmp_path / "side" / fold).glob("member*/member.pt"))
    f = b["folds"][0]
    assert 0 < f["train_wall_seconds"] and a["folds"][0]["train_wall_seconds"] > 0


def _tiny_set(tmp_path):
    from gnnst.cli import main  # noqa: F401 - the package's logging
    from gnnst.config import load_config
    from gnnst.graph.dataset import load_and_embed, resolve_patch_size
    from gnnst.train.prepare import prepare_training
    from gnnst_tinyrun import TINY_RUN, tiny_dataset

    d = tiny_dataset(tmp_path)
    cfg = load_config(None, [f"data.manifest={d['manifest']}", f"data.data_root={d['root']}",
                             f"data.cache_dir={d['cache']}", *TINY_RUN, "train.ensemble=2"])
    resolve_patch_size(cfg)
    return cfg, prepare_training(cfg, load_and_embed(cfg, progress=False), ["S1", "S2"], ["S3"])


def _failing(message: str | None):
    def fit_member(cfg, ts, fdir, i, **kw):
        if i == 1:
            if message is None:
                os._exit(3)  # the process dies, as when the kernel kills it
            from gnnst.errors import GnnstError

            raise GnnstError(message)
        return real(cfg, ts, fdir, i, **kw)

    from gnnst.train.ensemble import fit_member as real

    return fit_member


def test_a_failing_member_raises_its_error_and_a_dead_process_is_one_line(tmp_path, monkeypatch):
    import gnnst.train.ensemble as ens
    from gnnst.errors import GnnstError

    cfg, ts = _tiny_set(tmp_path)
    kw = dict(procs=2, threads=1, resume=False, device=torch.device("cpu"), progress=False)
    monkeypatch.setattr(ens, "fit_member", _failing("member 1: bad value"))
    with pytest.raises(GnnstError, match="member 1: bad value"):
        ens.fit_members_forked(cfg, ts, tmp_path / "a", [0, 1], **kw)
    monkeypatch.setattr(ens, "fit_member", _failing(None))
    with pytest.raises(GnnstError, match="died.*train.member_procs=1") as e:
        ens.fit_members_forked(cfg, ts, tmp_path / "b", [0, 1], **kw)
    assert "\n" not in str(e.value)
    assert not ens._FORKED  # the training set is not kept after the pool


def test_member_processes_rule(monkeypatch):
    """Null: every member at once from two threads up, the threads split (at least one each); 1, a CUDA device,
    one member or a single thread: one at a time with every thread."""
    from gnnst.config import load_config
    from gnnst.train.ensemble import member_processes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, one, two = (load_config(None, o) for o in ([], ["train.member_procs=1"], ["train.member_procs=2"]))
    for threads, cfg, n, device, want in [(2, auto, 3, cpu, (3, 1)), (16, auto, 3, cpu, (3, 5)),
                                          (1, auto, 3, cpu, (1, 1)), (16, one, 3, cpu, (1, 16)),
                                          (16, two, 3, cpu, (2, 8)), (16, auto, 1, cpu, (1, 16)),
                                          (16, auto, 3, cuda, (1, 16)), (1, two, 3, cpu, (2, 1))]:
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert member_processes(cfg, n, device) == want, (threads, n, device)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(sys, "platform", "darwin")  # fork is unsafe there
    assert member_processes(two, 3, cpu) == (1, 16)
