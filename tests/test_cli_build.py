import json

import numpy as np
import pytest
import torch

from gnnst.cli import main


def _build(ds, out, *extra):
    return main(["build-graphs", "--manifest", str(ds["manifest"]), "--data-root", str(ds["root"]),
                 "--cache-dir", str(ds["cache"]), "--out", str(out), "--quiet", *extra])


def test_build_graphs_end_to_end(tiny_dataset, capsys):
    ds = tiny_dataset
    out = ds["tmp"] / "graphs"
    assert _build(ds, out, "graph.k=4") == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["total_nodes"] == 24 and info["embedding_dim"] == 1280
    assert info["panel"]["source_slides"] == ["S1", "S2"]
    assert (out / "config.yaml").is_file() and (out / "build.log").is_file()
    for s, truth in ds["truth"].items():
        data = torch.load(out / f"{s}.pt", weights_only=False)
        n = len(truth["ids"])
        assert data.num_nodes == n and data.x.shape == (n, 1280) and data.y.shape == (n, info["num_genes"])
        assert data.barcodes == truth["ids"] and data.slide_id == s
        # every node has exactly k neighbours, all from its own slide
        assert torch.equal(torch.bincount(data.edge_index[1], minlength=n), torch.full((n,), 4))
        # positions in µm: the pitch is 200 µm
        d = data.edge_attr[:, 2]
        assert float(d.min()) == pytest.approx(200.0, rel=1e-4)
        assert torch.isfinite(data.x).all() and torch.isfinite(data.y).all()
    # a rebuild with only k changed re-encodes nothing: the cached embeddings are reused as they are
    cached = sorted((ds["cache"] / "embeddings").rglob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert len(cached) == 2
    assert _build(ds, out, "graph.k=2", "--overwrite") == 0  # (without --overwrite: refused, test_fault_injection)
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    data = torch.load(out / "S1.pt", weights_only=False)
    assert torch.equal(torch.bincount(data.edge_index[1]), torch.full((12,), 2))
    # ... and gives the same embeddings as a cold build
    out2 = ds["tmp"] / "cold"
    assert _build(ds, out2, "--no-cache", "graph.k=2") == 0
    np.testing.assert_allclose(torch.load(out2 / "S1.pt", weights_only=False).x, data.x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, pattern", [
    ("unknown_config_key", "unknown config key 'graph.kk'"),
    ("unknown_encoder", "unknown encoder 'nope'"),
    ("missing_image", "S2_HE.jpg"),
    ("corrupt_image", "S2_HE.jpg: cannot"),
    ("off_image", "slide 'S2': spot '2x2' at pixel .* lies outside the image"),
    ("unknown_manifest_key", "unknown manifest key '<top>.colour'"),
])
def test_bad_input_one_line_error_and_no_output(tiny_dataset, capsys, case, pattern):
    ds = tiny_dataset
    extra = []
    if case == "unknown_config_key":
        extra = ["graph.kk=3"]
    elif case == "unknown_encoder":
        extra = ["encoder.name=nope"]
    elif case == "missing_image":
        (ds["root"] / "S2_HE.jpg").unlink()
    elif case == "corrupt_image":
        p = ds["root"] / "S2_HE.jpg"
        p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    elif case == "off_image":
        sel = ds["root"] / "S2_selection.tsv"
        sel.write_text(sel.read_text().replace("\t20.00\t20.00\t1", "\t-50.00\t20.00\t1"))
    elif case == "unknown_manifest_key":
        ds["manifest"].write_text(ds["manifest"].read_text() + "colour: blue\n")
    out = ds["tmp"] / "out"
    rc = _build(ds, out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("gnnst: error: ")
    import re

    assert re.search(pattern, err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() or not any(out.iterdir())
