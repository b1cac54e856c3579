"""Figures: written by `gnnst train` (eval.figures) and by `gnnst plot`; gene picks on hand-made data."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from gnnst import keys
from gnnst.cli import main
from gnnst_tinyrun import SLIDES, tiny_run  # noqa: F401  (fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = [f"maps_{s}.png" for s in SLIDES] + ["pcc_per_gene.png", "moran.png"]


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_train_writes_figures(tiny_run):  # noqa: F811
    fig = tiny_run["run"] / "figures"
    for name in FIGURES:
        assert _is_png(fig / name) and (fig / name).stat().st_size > 10_000, name
    t = pd.read_csv(fig / "moran.csv")
    assert list(t.columns) == ["slide_id", "gene", "moran_measured", "moran_predicted", "pcc"]
    assert set(t["slide_id"]) == set(SLIDES) and t["moran_measured"].notna().any()


def test_plot_command(tiny_run, tmp_path):  # noqa: F811
    assert main(["plot", "--run", str(tiny_run["run"]), "--out", str(tmp_path), "--slides", "S2", "--no-image"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["maps_S2.png", "moran.png", "pcc_per_gene.png"]


def test_moran_table_matches_squidpy(tiny_run):  # noqa: F811
    import squidpy as sq

    from gnnst.eval.figures import moran_table
    from gnnst.export.anndata import slide_from_run

    a = slide_from_run(tiny_run["run"], "S1", image=False)
    t = moran_table({"S1": a}).set_index("gene")
    ref = sq.gr.spatial_autocorr(a, connectivity_key=keys.CONNECTIVITIES, mode="moran", layer=keys.PRED, copy=True,
                                 n_perms=None)
    np.testing.assert_allclose(t.loc[ref.index, "moran_predicted"], ref["I"], equal_nan=True)


def test_pick_genes_best_median_worst():
    from gnnst.eval.figures import pick_genes

    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 5))
    noise = rng.normal(size=(200, 5))
    weights = np.array([1.0, 0.2, -0.5, 0.6, 0.0])  # r falls with the weight: gene 0 best, gene 2 worst
    p = y * weights + noise * 0.5
    p[:, 4] = 1.0  # constant prediction: no r, never picked
    a = ad.AnnData(y.astype(np.float32), var=pd.DataFrame(index=[f"g{i}" for i in range(5)]))
    a.layers[keys.PRED] = p.astype(np.float32)
    picks = pick_genes(a)
    assert picks["best"][0] == "g0" and picks["worst"][0] == "g2"
    assert picks["median"][0] in ("g1", "g3")
    assert picks["best"][1] > picks["median"][1] > picks["worst"][1]


def test_train_without_figures_config_key():
    from gnnst.config import load_config

    assert load_config(None).eval.figures is True
    assert load_config(None, ["eval.figures=false"]).eval.figures is False
    with pytest.raises(Exception, match="eval.figures"):
        load_config(None, ["eval.figures=maybe"])
