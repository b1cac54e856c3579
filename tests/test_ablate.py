"""`gnnst ablate`: settings parsing, and a tiny end-to-end run (table, plot, resume)."""

import json

import pandas as pd
import pytest

from gnnst.cli import main
from gnnst.config import load_config
from gnnst.errors import GnnstError
from gnnst.eval.ablation import parse_setting, parse_settings, setting_config
from gnnst_tinyrun import TINY_RUN, data_args, tiny_dataset


@pytest.mark.parametrize("text, k, r, slug", [
    ("none", None, None, "none"), ("k=6", 6, None, "k6"), ("r=300", None, 300.0, "r300"),
    ("r=212.5", None, 212.5, "r212.5"), ("k=4,r=450", 4, 450.0, "k4_r450"), (" K=8 ", 8, None, "k8"),
])
def test_parse_setting(text, k, r, slug):
    s = parse_setting(text)
    assert (s.k, s.radius_um, s.slug) == (k, r, slug)
    assert s.use_graph == (k is not None or r is not None)


@pytest.mark.parametrize("text", ["", "k=", "k=0", "r=0", "k=-1", "radius=300", "k=6;r=3", "graph"])
def test_parse_setting_rejects(text):
    with pytest.raises(GnnstError, match="bad setting"):
        parse_setting(text)


def test_setting_config_overrides_only_graph_and_speed():
    cfg = load_config(None, ["graph.k=6", "train.ensemble=3", "train.lr=0.01"])
    none = setting_config(cfg, parse_setting("none"), baselines=False)
    assert none.model.use_graph is False and none.graph.k == 6
    r = setting_config(cfg, parse_setting("r=300"), baselines=True)
    assert r.model.use_graph is True and r.graph.k is None and r.graph.radius_um == 300.0
    for c in (none, r):
        assert c.train.ensemble == cfg.ablation.ensemble and c.eval.figures is False and c.train.lr == 0.01
    assert r.eval.baselines == cfg.eval.baselines == ["ridge", "ridge_neighbours"] and none.eval.baselines == []
    assert cfg.train.ensemble == 3  # the base config is not modified


def test_parse_settings_rejects_duplicates():
    with pytest.raises(GnnstError, match="listed twice"):
        parse_settings(load_config(None, ["ablation.settings=[k=6, K=6]"]))
    assert [s.slug for s in parse_settings(load_config(None))] == ["none", "k4", "k6", "k8", "r300", "r450", "r600"]


def test_ablate_bad_setting_is_a_user_error(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path / "a"), "ablation.settings=[none, k=x]"]) == 2
    assert "ablation.settings[1]" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_ablate_end_to_end(tmp_path, capsys):
    ds = tiny_dataset(tmp_path)
    out = tmp_path / "abl"
    # pitch 200 µm: r=250 joins the 4 side neighbours (and nothing diagonal at 283 µm)
    settings = "ablation.settings=[none, k=3, r=250]"
    assert main(["ablate", *data_args(ds), "--out", str(out), "--quiet", *TINY_RUN, settings]) == 0
    printed = capsys.readouterr().out
    assert "| none (no graph) |" in printed and "| r=250 |" in printed
    t = pd.read_csv(out / "ablation.csv")
    assert list(t["setting"]) == ["none", "k=3", "r=250", "ridge", "ridge_neighbours"]
    assert t.set_index("setting").loc["k=3", "neighbours_per_spot"] == 3.0
    assert 2.0 < t.set_index("setting").loc["r=250", "neighbours_per_spot"] < 4.0  # 4 inside, fewer at the border
    assert (t["slides"] == 3).all() and t["pcc_heg_per_slide_mean"].notna().all()
    assert t["pcc_all_pooled"].notna().all()
    # the table's figures are the runs' own (gnnst.metrics): the per-slide mean and the pooled value
    k3 = json.loads((out / "settings" / "k3" / "metrics.json").read_text())["summary"]
    row = t.set_index("setting").loc["k=3"]
    assert row["pcc_heg_per_slide_mean"] == pytest.approx(k3["pcc_heg_per_slide"], abs=1e-4)
    assert row["pcc_all_pooled"] == pytest.approx(k3["pcc_all_pooled"], abs=1e-4)
    md = (out / "ablation.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 6  # header + 5 rows
    assert "PCC HEG3/slide" in md.splitlines()[0]  # labels from gnnst.metrics, n from eval.n_heg
    with open(out / "ablation.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    cfg = json.loads((out / "settings" / "none" / "metrics.json").read_text())["config"]
    assert cfg["model"]["use_graph"] is False and cfg["train"]["ensemble"] == 1
    assert (out / "settings" / "k3" / "folds" / "patient_P1" / "model.pt").is_file()
    assert not list((out / "settings").glob("*/folds/*/member*"))  # per-member checkpoints removed
    # resume: every setting is reused, the table is identical
    before = t.drop(columns=["seconds"])
    assert main(["ablate", *data_args(ds), "--out", str(out), "--quiet", "--resume", *TINY_RUN, settings]) == 0
    after = pd.read_csv(out / "ablation.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(before, after)
