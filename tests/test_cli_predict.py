"""`gnnst predict` in spot mode on a tiny trained run, and its bad inputs."""

import re

import anndata as ad
import numpy as np
import pytest

from gnnst.cli import main
from gnnst_testdata import write_legacy_slide, write_manifest

TINY = ["train.epochs=2", "train.num_threads=1", "encoder.num_threads=1", "eval.figures=false", "train.ensemble=1", "model.hidden=32",
        "model.proj_dim=16", "model.heads=2",
        "expression.n_top_expressed=6", "expression.n_top_variable=6", "eval.n_heg=3", "eval.n_hvg=3",
        "train.val_fraction=0.25", "eval.baselines=[]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    root = tmp / "data"
    for i, s in enumerate(["S1", "S2", "S3"]):
        write_legacy_slide(root, s, seed=i, grid=(5, 4), image_size=(260, 220))
    m = write_manifest(tmp / "m.yaml", {"S1": "P1", "S2": "P2", "S3": "P3"})
    rc = main(["train", "--manifest", str(m), "--data-root", str(root), "--cache-dir", str(tmp / "cache"),
               "--out", str(tmp / "run"), "--quiet", *TINY])
    assert rc == 0
    return {"tmp": tmp, "root": root, "ckpt": tmp / "run" / "folds" / "patient_P1" / "model.pt"}


def _predict(t, *extra, spots=None, out=None):
    return main(["predict", "--checkpoint", str(t["ckpt"]), "--image", str(t["root"] / "S1_HE.jpg"),
                 "--spots", str(spots or t["root"] / "S1_selection.tsv"), "--out", str(out or t["tmp"] / "p.h5ad"),
                 "--cache-dir", str(t["tmp"] / "cache"), "--quiet", *extra])


def test_predict_unseen_slide_matches_the_run(trained):
    assert _predict(trained) == 0
    a = ad.read_h5ad(trained["tmp"] / "p.h5ad")
    run = ad.read_h5ad(trained["tmp"] / "run" / "predictions" / "S1.h5ad")  # S1 was held out by fold P1
    assert a.n_obs == 20 and list(a.var_names) == list(run.var_names)
    assert np.isfinite(a.X).all() and "spatial_connectivities" in a.obsp
    # same checkpoint, same spots, same graph: the CLI reproduces the cross-validation prediction
    np.testing.assert_allclose(a[run.obs_names].X, run.layers["gnnst_pred"], rtol=1e-4, atol=1e-4)


def test_unreadable_or_missing_checkpoint(trained, capsys):
    bad = trained["tmp"] / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    t = dict(trained, ckpt=bad)
    assert _predict(t) == 2
    assert "bad.pt: not a gnnst model file" in capsys.readouterr().err
    t = dict(trained, ckpt=trained["tmp"] / "missing.pt")
    assert _predict(t) == 2
    assert "model file not found" in capsys.readouterr().err


def test_bad_spot_tables(trained, capsys):
    p = trained["tmp"] / "spots.csv"
    p.write_text("a,b\n1,2\n")
    assert _predict(trained, spots=p) == 2
    assert "needs columns 'pixel_x, pixel_y' or 'x, y'" in capsys.readouterr().err
    p.write_text("barcode,x,y\ns1,10,10\ns2,5000,10\ns3,20,20\ns4,30,30\ns5,40,40\ns6,50,50\ns7,60,60\ns8,70,70\n")
    assert _predict(trained, "--mpp", "5", spots=p) == 2
    assert "spot 's2' at pixel (5000.0, 10.0) lies outside the image" in capsys.readouterr().err
    out = trained["tmp"] / "never.h5ad"
    assert _predict(trained, "--mpp", "5", spots=p, out=out) == 2 and not out.exists()


def test_bad_images(trained, capsys):
    """The image is decoded in a background thread; its errors still reach the user as one clear line."""
    corrupt = trained["tmp"] / "corrupt.jpg"
    corrupt.write_bytes((trained["root"] / "S1_HE.jpg").read_bytes()[:200])
    out = trained["tmp"] / "never.h5ad"
    for image, msg in [(corrupt, "corrupt.jpg: cannot decode image"),
                       (trained["tmp"] / "absent.jpg", "image file not found")]:
        rc = main(["predict", "--checkpoint", str(trained["ckpt"]), "--image", str(image),
                   "--spots", str(trained["root"] / "S1_selection.tsv"), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err and not out.exists()


def test_graph_dataset_errors(tmp_path):
    from gnnst.errors import GnnstError
    from gnnst.graph.dataset import GraphDataset

    with pytest.raises(GnnstError, match="graph folder not found"):
        GraphDataset(tmp_path / "nope")
    with pytest.raises(GnnstError, match="no dataset.json"):
        GraphDataset(tmp_path)


def test_spot_table_without_selected_spots(trained, capsys):
    p = trained["tmp"] / "none_selected.tsv"
    sel = (trained["root"] / "S1_selection.tsv").read_text().splitlines()
    p.write_text("\n".join([sel[0]] + [ln.rsplit("\t", 1)[0] + "\t0" for ln in sel[1:]]) + "\n")
    assert _predict(trained, spots=p) == 2
    assert "none_selected.tsv: no spots under tissue in the spot table of slide 'S1_HE': no row has 1 in column " \
           "'selected'" in capsys.readouterr().err


def test_pitch_outlier_named_by_barcode(trained, capsys):
    """predict --spots derives µm per pixel from the spot pitch when the image has none; a spot whose pixel
    position does not fit its array position is left out of the fit and named by its barcode."""
    p = trained["tmp"] / "shifted.tsv"
    lines = (trained["root"] / "S1_selection.tsv").read_text().splitlines()
    cols = lines[1].split("\t")  # spot 2x2: pixel (20, 20) -> (20, 140), three array steps off
    cols[5] = "140.00"
    p.write_text("\n".join([lines[0], "\t".join(cols)] + lines[2:]) + "\n")
    assert _predict(trained, spots=p, out=trained["tmp"] / "shifted.h5ad") == 0
    err = capsys.readouterr().err
    assert re.search(r"shifted.tsv: 1 spot\(s\) whose pixel position does not fit .*: 2x2 \(", err), err
    assert ad.read_h5ad(trained["tmp"] / "shifted.h5ad").uns["gnnst"]["mpp"] == pytest.approx(5.0, rel=1e-3)
