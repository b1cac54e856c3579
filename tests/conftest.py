"""Shared fixtures: tiny legacy-ST slides written by the tests, and the real her2st data when present."""

from __future__ import annotations

import pytest

from gnnst_testdata import HER2ST, write_legacy_slide, write_manifest


@pytest.fixture
def tiny_dataset(tmp_path):
    """Two tiny slides of two patients, a manifest and a cache folder, all under ``tmp_path``."""
    root = tmp_path / "data"
    truth = {s: write_legacy_slide(root, s, seed=i) for i, s in enumerate(["S1", "S2"])}
    manifest = write_manifest(tmp_path / "tiny.yaml", {"S1": "P1", "S2": "P2"})
    return {"root": root, "manifest": manifest, "cache": tmp_path / "cache", "truth": truth, "tmp": tmp_path}


@pytest.fixture(scope="session")
def her2st_root():
    if not (HER2ST / "B4.tsv.gz").is_file():
        pytest.skip(f"real her2st data not found at {HER2ST}")
    return HER2ST
