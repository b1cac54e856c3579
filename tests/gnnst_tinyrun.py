"""One tiny `gnnst train` run (three generated slides, figures on), made once per test session.

Used by the export and figure tests; the run takes a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gnnst_testdata import write_legacy_slide, write_manifest

TINY_RUN = ["train.epochs=2", "train.num_threads=1", "encoder.num_threads=1", "train.ensemble=1",
            "train.patience=10", "model.hidden=32", "model.proj_dim=16", "model.heads=2",
            "expression.n_top_expressed=6", "expression.n_top_variable=6", "eval.n_heg=3", "eval.n_hvg=3",
            "train.val_fraction=0.25", "train.batch_nodes=16", "graph.k=4"]
SLIDES = {"S1": "P1", "S2": "P2", "S3": "P3"}

_RUN: dict = {}


def tiny_dataset(root: Path) -> dict:
    """Three one-slide patients of 5 x 4 spots (pitch 40 px = 200 µm, so mpp = 5), a manifest, a cache."""
    data = root / "data"
    for i, s in enumerate(SLIDES):
        write_legacy_slide(data, s, seed=i, grid=(5, 4), image_size=(260, 220))
    m = write_manifest(root / "m.yaml", SLIDES)
    return {"root": data, "manifest": m, "cache": root / "cache"}


def data_args(ds: dict) -> list[str]:
    return ["--manifest", str(ds["manifest"]), "--data-root", str(ds["root"]), "--cache-dir", str(ds["cache"])]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """``{'run': train output folder, 'root', 'manifest', 'cache'}``; trained once per session."""
    if not _RUN:
        from gnnst.cli import main

        base = tmp_path_factory.mktemp("tinyrun")
        ds = tiny_dataset(base)
        run = base / "run"
        assert main(["train", *data_args(ds), "--out", str(run), "--quiet", *TINY_RUN]) == 0
        _RUN.update(ds, run=run)
    return _RUN
