"""Real-data tests on her2st; skipped when ../shared/data/her2st is absent."""

import pytest
import torch

pytestmark = pytest.mark.data


def test_read_b4(her2st_root):
    from gnnst.data.readers.legacy_st import read_legacy_st

    a = read_legacy_st(her2st_root / "B4.tsv.gz", her2st_root / "B4_selection.tsv", her2st_root / "B4_HE.jpg",
                       slide_id="B4")
    assert a.n_obs == 283 and a.n_vars > 15000
    assert 0.6 < a.uns["gnnst"]["mpp"] < 0.8


@pytest.mark.slow
def test_build_one_section(her2st_root, tmp_path):
    from gnnst.cli import main

    out = tmp_path / "g"
    rc = main(["build-graphs", "--data-root", str(her2st_root), "--cache-dir", str(tmp_path / "cache"),
               "--out", str(out), "--quiet", "data.slides=[B4]"])
    assert rc == 0
    data = torch.load(out / "B4.pt", weights_only=False)
    assert data.num_nodes == 283 and data.x.shape == (283, 1280)
    assert torch.equal(torch.bincount(data.edge_index[1], minlength=283), torch.full((283,), 6))
    assert data.y.shape[0] == 283 and data.y.shape[1] >= 100
