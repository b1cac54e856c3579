"""The gene panel (gnnst.data.expression.select_panel): every spot at once, or, above expression.panel_spots
(a cohort), one slide at a time with the highly-variable ranking on a sample."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from gnnst.config import load_config
from gnnst.data import expression
from gnnst.data.expression import SlideCounts, select_panel

VARIABLE = ["V0", "V1", "V2"]  # genes with a planted spot-to-spot variability, at three expression levels


def _slide(i: int, n: int = 300) -> SlideCounts:
    rng = np.random.default_rng(i)
    genes = [f"G{j}" for j in range(100)] + VARIABLE + ([f"X{i}"] if i % 2 else [])  # X: not in every slide
    lam = np.concatenate([np.linspace(0.5, 8, 100), [2.0, 4.0, 6.0]] + ([[3.0]] if i % 2 else []))
    counts = rng.poisson(lam, size=(n, len(genes))).astype(np.float32)
    counts[:, 100:103] *= 6 * (rng.random((n, 3)) < 0.2)  # each on in a fifth of the spots, off elsewhere
    return SlideCounts(slide_id=f"s{i}", genes=genes, counts=sp.csr_matrix(counts), totals=counts.sum(1) + 50)


def test_above_panel_spots_the_slides_are_read_one_at_a_time_with_the_same_choice(monkeypatch):
    slides = [_slide(i) for i in range(6)]  # 1,800 spots
    over = ["expression.n_top_expressed=10", "expression.n_top_variable=3", "expression.min_spot_fraction=0.05"]
    dense = select_panel(slides, load_config(None, over).expression)
    calls = []

    def lazy(i):
        def f():
            calls.append(i)
            return slides[i]
        return f

    cfg = load_config(None, [*over, "expression.panel_spots=300"]).expression
    with monkeypatch.context() as m:  # no matrix of every spot at once
        m.setattr(expression, "_select_panel_dense", lambda *a: (_ for _ in ()).throw(AssertionError("dense")))
        streamed = select_panel([lazy(i) for i in range(6)], cfg)
    assert sorted(calls) == sorted(list(range(6)) * 2)  # sizes and names, then the values: each slide twice
    assert streamed.heg == dense.heg  # means over every spot (float64 sums): the same ranking
    assert set(streamed.hvg) == set(dense.hvg) == set(VARIABLE)  # the planted variable genes, from ~300 spots
    assert all(not g.startswith("X") for g in streamed.genes)  # only genes every slide measures
    # at or below the cap, and with no cap, the panel is the one chosen on every spot at once
    for extra in ("expression.panel_spots=1800", "expression.panel_spots=null"):
        calls.clear()
        got = select_panel([lazy(i) for i in range(6)], load_config(None, [*over, extra]).expression)
        assert (got.genes, got.heg, got.hvg) == (dense.genes, dense.heg, dense.hvg)
        assert sorted(calls) == list(range(6))  # each slide read once
