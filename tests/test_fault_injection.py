"""Fault injection: every CLI command against a table of bad inputs.

Each case must end with exit status 2 and exactly one stderr line starting ``gnnst: error:`` that names
the file, key or value at fault; no traceback; nothing created or changed anywhere under the test's
folder (data, cache and outputs alike); and, since none of these faults needs any work to be known,
within 3 s of calling ``main`` (measured in-process, heavy imports done beforehand: a sanity bound on
"fails before work", not a speed target).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from gnnst.cli import main
from gnnst_tinyrun import data_args, tiny_dataset

SECONDS = 3.0
TINY = ["train.num_threads=1", "encoder.num_threads=1", "train.ensemble=1", "model.hidden=16", "model.proj_dim=8",
        "model.heads=2", "graph.k=4"]


def unwritable_dir(base: Path) -> Path | None:
    """A folder where no file can be created: ``base/ro`` with mode 0o555 for an ordinary user; for root
    (permissions do not apply) ``/proc``, where nothing can be created; ``None`` when neither works."""
    if os.geteuid() != 0:
        ro = base / "ro"
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
        return ro
    try:
        fd, tmp = tempfile.mkstemp(dir="/proc")
    except OSError:
        return Path("/proc")
    os.close(fd)
    os.unlink(tmp)
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny slides, a manifest, an untrained checkpoint (graph.k=6), a graph folder, a train run folder
    and an ablation folder (files as their commands write them, no training), a 4-spot table, a file."""
    # the commands' heavy imports, so that the timing below measures the commands, not importing torch
    import gnnst.eval.ablation  # noqa: F401
    import gnnst.eval.crossval  # noqa: F401
    import gnnst.export.anndata  # noqa: F401
    import gnnst.graph.dataset  # noqa: F401
    import gnnst.inference  # noqa: F401
    from gnnst.config import ModelConfig, dump_config, load_config
    from gnnst.graph.dataset import resolve_patch_size
    from gnnst.predictor import EncoderInfo, TrainedModel

    base = tmp_path_factory.mktemp("faults")
    w = tiny_dataset(base)
    enc = EncoderInfo(name="efficientnet_lite0", identity="test", input_size=224, dim=8)
    ckpt = base / "model.pt"
    TrainedModel.untrained(enc, [f"G{i}" for i in range(12)],
                           model_config=ModelConfig(predict_mode="head", hidden=16, proj_dim=8, heads=2)).save(ckpt)
    cfg = load_config(None, [f"data.manifest={w['manifest']}", f"data.data_root={w['root']}",
                             f"data.cache_dir={w['cache']}", *TINY])
    resolve_patch_size(cfg)  # as every command records it
    run = base / "run"  # a train run (as gnnst train leaves one)
    (run / "folds" / "patient_P1").mkdir(parents=True)
    (run / "predictions").mkdir()
    (run / "predictions" / "S1.h5ad").write_bytes(b"")
    dump_config(cfg, run / "config.yaml")
    graphs = base / "graphs"
    graphs.mkdir()
    (graphs / "S1.pt").write_bytes(b"")
    (graphs / "dataset.json").write_text("{}")
    dump_config(cfg, graphs / "config.yaml")
    abl = base / "abl"
    (abl / "settings").mkdir(parents=True)
    dump_config(cfg, abl / "config.yaml")
    mixed = base / "mixed"  # a train run and a user's file
    shutil.copytree(run, mixed)
    (mixed / "notes.txt").write_text("mine")
    spots4 = base / "spots4.tsv"
    spots4.write_text("pixel_x\tpixel_y\n20\t20\n60\t20\n20\t60\n60\t60\n")
    afile = base / "a_file.txt"
    afile.write_text("not a folder")
    (base / "empty_dir").mkdir()
    w.update(base=base, ckpt=ckpt, run=run, graphs=graphs, abl=abl, mixed=mixed, spots4=spots4, afile=afile,
             ro=unwritable_dir(base))
    return w


def _cmd(command, w, out, *extra):
    """``gnnst <command>`` on the tiny dataset into ``out``; flags first, then the dotted overrides."""
    flags = [f for f in extra if f.startswith("--")]
    return [command, *data_args(w), "--quiet", "--out", str(out), *flags, *TINY, *[e for e in extra if e not in flags]]


def _predict(w, *, out=None, spots=None, ckpt=None, image=None):
    return ["predict", "--checkpoint", str(ckpt or w["ckpt"]), "--image", str(image or w["root"] / "S1_HE.jpg"),
            "--spots", str(spots or w["root"] / "S1_selection.tsv"), "--out", str(out or w["base"] / "p.h5ad"),
            "--cache-dir", str(w["cache"]), "--quiet"]


# (case id, argv builder, pattern the one error line must match)
CASES = [
    # ---------------------------------------------------------------- build-graphs
    ("build:out_is_file", lambda w: _cmd("build-graphs", w, str(w["afile"])),
     r"--out .*a_file\.txt: exists and is a file, not a folder"),
    ("build:out_unwritable", lambda w: _cmd("build-graphs", w, f"{w['ro']}/g"), r"--out .*/g: cannot write here"),
    ("build:out_under_a_file", lambda w: _cmd("build-graphs", w, f"{w['afile']}/g"),
     r"cannot be created \(.*a_file\.txt is a file"),
    ("build:holds_graphs", lambda w: _cmd("build-graphs", w, str(w["graphs"])),
     r"--out .*graphs already holds a graph folder .*replace it with --overwrite"),
    ("build:patch_size_um=0", lambda w: _cmd("build-graphs", w, f"{w['base']}/new", "patch.size_um=0"),
     r"config key 'patch.size_um': expected a number > 0 or null, got 0"),
    ("build:k_vs_spots", lambda w: _cmd("build-graphs", w, f"{w['base']}/new", "graph.k=20"),
     r"slide 'S1' has 20 spots, too few for graph.k=20 \(.*at least 21\)"),
    ("build:no_manifest", lambda w: ["build-graphs", "--manifest", f"{w['base']}/nope.yaml", "--out",
                                     f"{w['base']}/new"],
     r"nope\.yaml"),
    # ---------------------------------------------------------------- train
    ("train:out_is_file", lambda w: _cmd("train", w, str(w["afile"])), r"a_file\.txt: exists and is a file"),
    ("train:out_unwritable", lambda w: _cmd("train", w, f"{w['ro']}/t"), r"--out .*/t: cannot write here"),
    ("train:epochs=0", lambda w: _cmd("train", w, f"{w['base']}/new", "train.epochs=0"),
     r"config key 'train.epochs': expected an integer >= 1, got 0"),
    ("train:lr=-1", lambda w: _cmd("train", w, f"{w['base']}/new", "train.lr=-1"),
     r"config key 'train.lr': expected a number > 0, got -1"),
    ("train:ensemble=0", lambda w: _cmd("train", w, f"{w['base']}/new", "train.ensemble=0"),
     r"config key 'train.ensemble': expected an integer >= 1, got 0"),
    ("train:patch_size_um=0", lambda w: _cmd("train", w, f"{w['base']}/new", "patch.size_um=0"),
     r"config key 'patch.size_um'"),
    ("train:unknown_key", lambda w: _cmd("train", w, f"{w['base']}/new", "train.lrr=1"),
     r"unknown config key 'train.lrr'"),
    ("train:k_vs_spots", lambda w: _cmd("train", w, f"{w['base']}/new", "graph.k=25"),
     r"slide 'S1' has 20 spots, too few for graph.k=25"),
    ("train:holds_a_run", lambda w: _cmd("train", w, str(w["run"])),
     r"--out .*run already holds a train run \(config.yaml, folds, predictions\): continue it with --resume"),
    ("train:resume_other_config", lambda w: _cmd("train", w, str(w["run"]), "--resume", "train.lr=0.002"),
     r"--resume: .*run was run with another config \(train.lr: 0.001 -> 0.002\)"),
    ("train:resume_other_device", lambda w: _cmd("train", w, str(w["run"]), "--resume", "train.device=cpu"),
     r"another config \(train.device: \"auto\" -> \"cpu\"\)"),
    ("train:overwrite_user_file", lambda w: _cmd("train", w, str(w["mixed"]), "--overwrite"),
     r"--overwrite: .*mixed also holds 'notes.txt', which `gnnst train` did not write"),
    ("train:resume_and_overwrite", lambda w: _cmd("train", w, str(w["run"]), "--resume", "--overwrite"),
     r"--resume continues .* --overwrite replaces it"),
    ("train:into_graph_folder", lambda w: _cmd("train", w, str(w["graphs"]), "--overwrite"),
     r"holds a graph folder \(of `gnnst build-graphs`\), not a train run"),
    # ---------------------------------------------------------------- predict
    ("predict:out_is_folder", lambda w: _predict(w, out=w["base"] / "empty_dir"),
     r"--out .*empty_dir: is a folder; give a file name"),
    ("predict:out_not_h5ad", lambda w: _predict(w, out=w["base"] / "p.csv"), r"--out must end in \.h5ad or \.zarr, got .*p\.csv"),
    ("predict:out_unwritable", lambda w: _predict(w, out=f"{w['ro']}/p.h5ad"), r"--out .*p\.h5ad: cannot write here"),
    ("predict:out_under_a_file", lambda w: _predict(w, out=f"{w['afile']}/p.h5ad"), r"a_file\.txt is a file"),
    ("predict:fewer_spots_than_k", lambda w: _predict(w, spots=w["spots4"]),
     r"--spots .*spots4\.tsv has 4 spots, too few for graph.k=6 of .*model\.pt .*at least 7\); predict at more spots"),
    ("predict:no_checkpoint", lambda w: _predict(w, ckpt=w["base"] / "missing.pt"), r"missing\.pt"),
    ("predict:no_image", lambda w: _predict(w, image=w["base"] / "missing.jpg"), r"missing\.jpg"),
    ("predict:no_spots", lambda w: _predict(w, spots=w["base"] / "missing.tsv"),
     r"spot table not found: .*missing\.tsv"),
    # ---------------------------------------------------------------- ablate
    ("ablate:out_is_file", lambda w: _cmd("ablate", w, str(w["afile"])), r"a_file\.txt: exists and is a file"),
    ("ablate:bad_setting", lambda w: _cmd("ablate", w, f"{w['base']}/new", "ablation.settings=[k=0]"),
     r"config key 'ablation.settings\[0\]': bad setting 'k=0'"),
    ("ablate:setting_k_vs_spots", lambda w: _cmd("ablate", w, f"{w['base']}/new",
                                             "ablation.settings=[none, k=30]"),
     r"slide 'S1' has 20 spots, too few for the setting 'k=30' of ablation.settings"),
    ("ablate:holds_an_ablation", lambda w: _cmd("ablate", w, str(w["abl"])),
     r"already holds an ablation \(config.yaml, settings\)"),
    ("ablate:resume_other_config", lambda w: _cmd("ablate", w, str(w["abl"]), "--resume",
                                              "ablation.ensemble=2"),
     r"another config \(ablation.ensemble: 1 -> 2\)"),
    ("ablate:lr=-1", lambda w: _cmd("ablate", w, f"{w['base']}/new", "train.lr=-1"),
     r"config key 'train.lr'"),
    # ---------------------------------------------------------------- export
    ("export:no_run", lambda w: ["export", "--run", f"{w['base']}/nope", "--out", f"{w['base']}/new"],
     r"run folder not found: .*nope"),
    ("export:not_a_run", lambda w: ["export", "--run", str(w["base"] / "empty_dir"), "--out", f"{w['base']}/new"],
     r"empty_dir: no predictions/<slide>\.h5ad"),
    ("export:out_is_file", lambda w: ["export", "--run", str(w["run"]), "--out", str(w["afile"])],
     r"a_file\.txt: exists and is a file"),
    ("export:out_unwritable", lambda w: ["export", "--run", str(w["run"]), "--out", f"{w['ro']}/e"],
     r"--out .*/e: cannot write here"),
    ("export:unknown_slide", lambda w: ["export", "--run", str(w["run"]), "--out", f"{w['base']}/new", "--slides",
                                        "S9"],
     r"no predictions for slide 'S9' \(have: S1\)"),
    # ---------------------------------------------------------------- plot
    ("plot:no_run", lambda w: ["plot", "--run", f"{w['base']}/nope", "--out", f"{w['base']}/new"],
     r"run folder not found: .*nope"),
    ("plot:out_is_file", lambda w: ["plot", "--run", str(w["run"]), "--out", str(w["afile"])],
     r"a_file\.txt: exists and is a file"),
    ("plot:unknown_slide", lambda w: ["plot", "--run", str(w["run"]), "--out", f"{w['base']}/new", "--slides", "S9"],
     r"no predictions for slide 'S9'"),
]


def snapshot(root: Path) -> dict:
    """Every path under ``root``: a folder as ``"dir"`` (its mtime changes when the writability check
    creates and removes a file in it), a file as its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        out.update({str((Path(dirpath) / n).relative_to(root)): "dir" for n in dirnames})
        for n in filenames:
            st = (Path(dirpath) / n).lstat()
            out[str((Path(dirpath) / n).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def test_every_command_is_in_the_table():
    from gnnst.cli import COMMANDS

    names = {"build": "build-graphs"}
    covered = {names.get(c.split(":")[0], c.split(":")[0]) for c, _, _ in CASES}
    assert covered == set(COMMANDS)


@pytest.mark.parametrize("case, argv, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_at_once_cleanly(world, capsys, case, argv, pattern):
    if "unwritable" in case and world["ro"] is None:
        pytest.skip("no folder here that refuses new files (root on a system without a read-only /proc)")
    args = argv(world)
    before = snapshot(world["base"])
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(args)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gnnst: error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert snapshot(world["base"]) == before  # nothing created, changed or removed
    assert seconds < SECONDS, f"{case}: {seconds:.2f} s before failing"
