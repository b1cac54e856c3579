"""Benchmark: speed and memory of the three things a user runs on her2st-6 — building the graphs,
training (cross-validation), and predicting an unseen slide — each in its own child process.

    python benchmarks/speed.py [--cache-dir /tmp/gcache] [--build-repeats 3] [--predict-repeats 3]
                               [--train-repeats 3] [--baseline REV] [--no-write]

1. Graph building, cold (empty cache in a temporary folder) and warm, split into decode, crop, encode
   and graph: the measurement of ``benchmarks/build_graphs.py`` (:func:`run_build_benchmark`), reused.
2. Training: ``gnnst train --config configs/her2st.yaml`` with the defaults (6 folds, ensemble of 3)
   on the warm embedding cache; per fold, the seconds of the fold and of training, and the training
   throughput (centre spots per second, ``FitResult.nodes_per_second``); medians over the folds of
   ``--train-repeats`` runs (with ``--baseline``, this checkout's and the baseline's runs alternate).
3. Unseen-slide inference end to end: ``gnnst.cli.main(["predict", ...])`` with the B4 fold's
   checkpoint (B4 was held out of its training) on B4's H&E image and spot table, a fresh cache
   folder each time so the patches are encoded; spots per second; median over repeats.

``--baseline REV`` runs the same training command and the cold builds with the code of git revision
``REV`` too (a temporary worktree first on ``PYTHONPATH``), right after this checkout's, so a
regression shows as a ratio measured on the same machine in the same command. The training runs of the
two alternate (this, baseline, this, ...), so a drift of the machine's speed during the command falls on
both alike.

Peak memory of each part is the child's ``ru_maxrss`` (``os.wait4``): the largest single process of its
tree, so with ensemble members side by side (``train.member_procs``) one of them, not their sum.
Targets on this 2-core machine: cold build <= 30 s, one fold with the default ensemble <= 45 s (issue
13's "no regression" target; it was 60 s before), inference >= 50 spots/s. Prints its table and writes
the section ``speed`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

DATA = Path("/work/shared/data/her2st")  # the developers' read-only copy (manifest search root)
PREDICT_SLIDE = "B4"  # the patient-disjoint fold's held-out slide
TARGETS = {"cold_build_s": 30.0, "fold_s": 45.0, "predict_spots_per_s": 50.0}


def _run(cmd: list[str], **kw) -> tuple[int, float, float, str, float]:
    """Run ``cmd``; (exit code, wall seconds, peak RSS in MB of the child as the kernel counted it, stdout,
    CPU seconds of the child, user + system: less sensitive than wall time to other jobs on the machine)."""
    t0 = time.perf_counter()
    kw.setdefault("cwd", REPO)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kw)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024, out, usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------ training
def bench_train(cache_dir: str, workdir: Path, folds: list[str] | None, tree: str | None = None,
                run: int = 0) -> dict:
    """One ``gnnst train`` run; ``tree``: run the code of that checkout instead (the baseline)."""
    out = workdir / (("train" if tree is None else "train_baseline") + (f"{run}" if run else ""))
    cmd = [sys.executable, "-m", "gnnst", "train", "--config", "configs/her2st.yaml", "--cache-dir", cache_dir,
           "--out", str(out), "--quiet", "eval.final_model=false"] + (
        [f"eval.only_folds=[{','.join(folds)}]"] if folds else [])
    # another checkout looks for the data beside itself: name the developers' copy unless the user did
    env = {"GNNST_DATA_ROOT": str(DATA), **os.environ}
    kw = {"env": env} if tree is None else {"cwd": tree, "env": dict(env, PYTHONPATH=tree)}
    code, wall, rss, _, cpu = _run(cmd, stderr=subprocess.DEVNULL, **kw)
    if code != 0:
        raise RuntimeError(f"gnnst train failed with status {code}: {' '.join(cmd)}")
    m = json.loads((out / "metrics.json").read_text())
    folds = m["folds"]
    return {"wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": rss, "folds": len(folds),
            "ensemble": m["config"]["train"]["ensemble"],
            "fold_seconds": [f["fold_seconds"] for f in folds],
            # the members' wall time (side by side: less than the sum); older code records only the sum
            "train_seconds": [f.get("train_wall_seconds") or f["train_seconds"] for f in folds],
            "nodes_per_second": [f["nodes_per_second"] for f in folds],
            "epochs_run": [f["epochs_run"] for f in folds], "fold_names": [f["name"] for f in folds],
            "pcc_heg_per_slide": m["summary"]["pcc_heg_per_slide"],
            "checkpoint": str(out / "folds" / PREDICT_SLIDE / "model.pt")}


def merge_runs(runs: list[dict]) -> dict:
    """Repeated runs of :func:`bench_train` as one record: the folds of every run (their medians are the
    table's), wall and CPU seconds as medians, the highest peak RSS, the first run's checkpoint."""
    first = runs[0]
    cat = lambda k: [v for r in runs for v in r[k]]  # noqa: E731
    return {**first, "runs": len(runs), "fold_seconds": cat("fold_seconds"), "train_seconds": cat("train_seconds"),
            "nodes_per_second": cat("nodes_per_second"), "epochs_run": cat("epochs_run"),
            "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "wall_seconds_runs": [r["wall_seconds"] for r in runs],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "same_pcc": len({r["pcc_heg_per_slide"] for r in runs}) == 1}


# ------------------------------------------------------------------------------------ inference
def _predict_child(args: list[str]) -> None:
    """In the child: time ``gnnst.cli.main(['predict', ...])`` alone (the process also pays imports)."""
    t0 = time.perf_counter()
    from gnnst.cli import main

    t1 = time.perf_counter()
    code = main(["predict", *args])
    t2 = time.perf_counter()
    print(json.dumps({"code": code, "import_seconds": t1 - t0, "main_seconds": t2 - t1}), flush=True)
    sys.stderr.flush()
    os._exit(code)  # as the `gnnst` executable leaves (gnnst.cli.run_and_exit): no interpreter teardown


def bench_predict(checkpoint: str, workdir: Path, repeats: int) -> dict:
    import anndata as ad

    runs = []
    for i in range(repeats):
        cache = workdir / f"predict_cache{i}"  # fresh: the patches are encoded every time
        out = workdir / f"pred{i}.h5ad"
        args = ["--checkpoint", checkpoint, "--image", str(DATA / f"{PREDICT_SLIDE}_HE.jpg"),
                "--spots", str(DATA / f"{PREDICT_SLIDE}_selection.tsv"), "--out", str(out), "--cache-dir", str(cache),
                "--quiet"]
        code, wall, rss, stdout, cpu = _run([sys.executable, __file__, "--child-predict", *args],
                                            stderr=subprocess.DEVNULL)
        if code != 0:
            raise RuntimeError(f"gnnst predict failed with status {code}")
        inner = json.loads(stdout.strip().splitlines()[-1])
        if inner["code"] != 0:
            raise RuntimeError(f"gnnst predict returned {inner['code']}")
        n = ad.read_h5ad(out, backed="r").n_obs
        runs.append({"spots": n, "process_seconds": wall, "main_seconds": inner["main_seconds"],
                     "import_seconds": inner["import_seconds"], "peak_rss_mb": rss, "cpu_seconds": cpu})
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    n = runs[0]["spots"]
    return {"runs": runs, "spots": n, "main_seconds": med("main_seconds"), "process_seconds": med("process_seconds"),
            "import_seconds": med("import_seconds"), "cpu_seconds": med("cpu_seconds"), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "spots_per_second_main": n / med("main_seconds"), "spots_per_second_process": n / med("process_seconds")}


# ------------------------------------------------------------------------------------ report
def _ok(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def _runs(t: dict) -> str:
    n = t.get("runs", 1)
    return "one `gnnst train` run" if n == 1 else f"{n} `gnnst train` runs"


def _median(t: dict) -> str:
    return "" if t.get("runs", 1) == 1 else " (median of the runs)"


def format_report(r: dict) -> str:
    b, t, p = r["build"], r["train"], r["predict"]
    c, w = b["cold"], b["warm"]
    fold_med = statistics.median(t["fold_seconds"])
    train_med = statistics.median(t["train_seconds"])
    nps = statistics.median(t["nodes_per_second"])
    stage = lambda d: f"decode {d['decode']:.2f}, crop {d['crop']:.2f}, encode {d['encode']:.2f}, graph {d['graph']:.2f}"  # noqa: E731
    lines = [
        "| part | measured | target | verdict (this run) | peak RSS (MB) |",
        "|---|---|---|---|---|",
        f"| cold graph build, {b['nodes']} spots (empty cache) | {c['total']:.1f} s in the build, "
        f"{c['process']:.1f} s with process start ({stage(c)}) | <= {TARGETS['cold_build_s']:.0f} s | "
        f"{_ok(c['total'] <= TARGETS['cold_build_s'])} (build); {_ok(c['process'] <= TARGETS['cold_build_s'])} "
        f"(process) | {c['peak_rss_mb']:.0f} |",
        f"| warm graph build (cached embeddings) | {w['total']:.2f} s in the build, {w['process']:.1f} s with "
        f"process start ({stage(w)}) | – | – | {w['peak_rss_mb']:.0f} |",
        f"| one fold of `gnnst train` (ensemble of {t['ensemble']}, ridge included) | median {fold_med:.1f} s "
        f"(range {min(t['fold_seconds']):.1f}–{max(t['fold_seconds']):.1f}); training the members "
        f"{train_med:.1f} s (wall) | "
        f"<= {TARGETS['fold_s']:.0f} s | {_ok(fold_med <= TARGETS['fold_s'])} | {t['peak_rss_mb']:.0f} (whole run) |",
        f"| training throughput of one member (its own process's, side by side with the others) | median "
        f"{nps:.0f} centre spots/s (range {min(t['nodes_per_second']):.0f}–"
        f"{max(t['nodes_per_second']):.0f}) | – | – | – |",
        f"| unseen-slide inference, {p['spots']} spots ({PREDICT_SLIDE}), image in, .h5ad out | "
        f"{p['spots_per_second_main']:.0f} spots/s in `main` ({p['main_seconds']:.1f} s); "
        f"{p['spots_per_second_process']:.0f} spots/s with process start and imports ({p['process_seconds']:.1f} s) | "
        f">= {TARGETS['predict_spots_per_s']:.0f} spots/s | {_ok(p['spots_per_second_main'] >= TARGETS['predict_spots_per_s'])} "
        f"(`main`); {_ok(p['spots_per_second_process'] >= TARGETS['predict_spots_per_s'])} (process) | "
        f"{p['peak_rss_mb']:.0f} |",
    ]
    notes = [
        "",
        f"- Build: medians over {b['repeats']} cold and {b['repeats']} warm builds, each in a fresh process "
        "(`benchmarks/build_graphs.py`'s measurement, reused; its own section has the full stage table). "
        "'in the build' = `build_graphs` from reading the slides to writing the graphs; 'with process start' adds "
        "Python and library imports.",
        f"- Training: {_runs(t)} with the defaults (folds run: {', '.join(t['fold_names'])}; ensemble "
        f"{t['ensemble']}, "
        + ("each run on its own EMPTY embedding cache: a first run, the fold's stain-normalised patches embedded "
           "within its fold seconds, the graphs built before the folds" if r.get("train_cold") else "warm cache")
        + f"); fold seconds = training all members + predictions + ridge + writing (each run's: "
        f"{', '.join('%.1f' % v for v in t['fold_seconds'])}); per-fold epochs run "
        f"{t['epochs_run']}; whole run {t['wall_seconds']:.0f} s wall{_median(t)}, {t['cpu_seconds']:.0f} s CPU (user + system) "
        f"on {r['cores']} cores; summary PCC HEG per slide (eval.n_heg genes) "
        f"{t['pcc_heg_per_slide']:.3f} (a sanity check, not the accuracy benchmark"
        + ("" if t.get("same_pcc", True) else "; NOT the same in every run") + ").",
        f"- Inference: `gnnst.cli.main(['predict', ...])` with the checkpoint of fold {PREDICT_SLIDE} (never trained "
        f"on {PREDICT_SLIDE}), a fresh cache folder per run (patches decoded, cropped and encoded every time), "
        f"median of {len(p['runs'])} runs ({', '.join('%.1f' % x['main_seconds'] for x in p['runs'])} s in `main`); "
        f"the rest of the process time is interpreter start-up (the package imports lazily, inside `main`; the child leaves with `os._exit` as the `gnnst` executable does); the process used {p['cpu_seconds']:.1f} s "
        f"of CPU (user + system, median), i.e. at least {p['cpu_seconds'] / r['cores']:.1f} s of wall time on "
        f"{r['cores']} free cores.",
        f"- Load average (1/5/15 min) before {', '.join(f'{v:.1f}' for v in r['loadavg_before'])}, after "
        f"{', '.join(f'{v:.1f}' for v in r['loadavg_after'])}: the machine is shared with other developers' jobs, "
        "so these times may be inflated.",
    ]
    tb = r.get("train_baseline")
    if tb:
        fb = statistics.median(tb["fold_seconds"])
        notes.append(
            f"- Against commit {tb['rev']} (the same `gnnst train` command with that code, "
            + ("run right after, " if tb.get("runs", 1) == 1 else f"{_runs(tb)} alternating with this checkout's, ")
            + f"{'each its own empty cache' if r.get('train_cold') else 'same cache'}; "
            f"its folds {', '.join('%.1f' % v for v in tb['fold_seconds'])} s): fold median {fold_med:.1f} s against {fb:.1f} s ({fold_med / fb:.2f}x), whole run "
            f"{t['wall_seconds']:.0f} s against {tb['wall_seconds']:.0f} s ({t['wall_seconds'] / tb['wall_seconds']:.2f}x), "
            f"CPU {t['cpu_seconds']:.0f} s against {tb['cpu_seconds']:.0f} s, peak RSS {t['peak_rss_mb']:.0f} MB against "
            f"{tb['peak_rss_mb']:.0f} MB; its PCC HEG per slide {tb['pcc_heg_per_slide']:.3f}.")
    bb = b.get("baseline")
    if bb:
        notes.append(
            f"- Cold build against commit {bb['rev']} (interleaved; `build_graphs` section for the stages): "
            f"{c['total']:.1f} s against {bb['cold'].get('total', float('nan')):.1f} s in the build.")
    if max(r["loadavg_before"][0], r["loadavg_after"][0]) > 1.5 * r["cores"]:  # 1-minute load averages
        notes.append(
            f"- The machine was oversubscribed during this run (load above {1.5 * r['cores']:.0f} on {r['cores']} cores), "
            "so the wall times above measure the contention more than the code and the verdicts do not judge the "
            "targets; torch's 2 threads per process also spin while waiting for each other under such load, which "
            "inflates the CPU seconds. Rerun `benchmarks/speed.py` on a quiet machine to judge them.")
    return "\n".join(lines + notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default="/tmp/gcache", help="warm embedding cache for training")
    p.add_argument("--train-cold", action="store_true",
                   help="train each run (this checkout's, the baseline's) on its own empty embedding cache: fold "
                        "seconds then include the fold's stain-normalised re-embedding (a first run's cost)")
    p.add_argument("--build-repeats", type=int, default=3)
    p.add_argument("--predict-repeats", type=int, default=3)
    p.add_argument("--train-repeats", type=int, default=3,
                   help="gnnst train runs (each; with --baseline the two alternate); the fold figures are medians "
                        "over the folds of every run")
    p.add_argument("--train-folds", nargs="*", default=[PREDICT_SLIDE],
                   help=f"folds trained (default {PREDICT_SLIDE}, whose checkpoint the inference part uses; "
                        "none given = all six)")
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--note", default="", help="a remark recorded with the table")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also train and cold-build with this git revision's code, for the ratios")
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child-predict":
        _predict_child(sys.argv[2:])
        return 0
    p.add_argument("--from-json", default=None, help="render a recorded run (benchmarks/results/speed.json) instead")
    args = p.parse_args(argv)

    from _results import machine_info, write_section
    from build_graphs import run_build_benchmark

    if args.from_json:
        r = json.loads(Path(args.from_json).read_text())
        text = format_report(r) + f"\n- Rendered from the recorded run in `{args.from_json}`."
        if args.note:
            text += f"\n- Note: {args.note}"
        print(text)
        if not args.no_write:
            write_section("speed", "Speed and memory on her2st-6 (`benchmarks/speed.py`)", text)
        return 0
    r = {"loadavg_before": os.getloadavg(), "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="gnnst-speed-") as tmp:
        tmp = Path(tmp)
        print("training (gnnst train, defaults) ...", flush=True)
        r["train_cold"] = args.train_cold
        cache = (lambda name: str(tmp / name)) if args.train_cold else (lambda name: args.cache_dir)  # noqa: E731
        folds = args.train_folds or None
        tree = None
        if args.baseline:
            tree = str(tmp / "baseline")
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", tree, args.baseline], check=True,
                           capture_output=True)
        try:
            runs, base_runs = [], []
            for i in range(args.train_repeats):  # this checkout and the baseline alternate: drift falls on both
                print(f"training, run {i + 1} of {args.train_repeats} ...", flush=True)
                runs.append(bench_train(cache(f"cache_train{i}"), tmp, folds, run=i))
                if tree is not None:
                    print(f"training with the code at {args.baseline}, run {i + 1} ...", flush=True)
                    base_runs.append(bench_train(cache(f"cache_train_baseline{i}"), tmp, folds, tree=tree, run=i))
            r["train"] = merge_runs(runs)
            if tree is not None:
                r["train_baseline"] = merge_runs(base_runs)
                r["train_baseline"]["rev"] = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                                                            check=True, capture_output=True, text=True).stdout.strip()
        finally:
            if tree is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tree], capture_output=True)
        print("unseen-slide inference ...", flush=True)
        r["predict"] = bench_predict(r["train"]["checkpoint"], tmp, args.predict_repeats)
        print("graph building (cold and warm) ...", flush=True)
        r["build"] = run_build_benchmark(args.build_repeats, str(DATA), baseline=args.baseline)
    r["loadavg_after"] = os.getloadavg()
    text = format_report(r)
    if args.note:
        text += f"\n- Note: {args.note}"
    print(machine_info())
    print(text)
    if not args.no_write:
        write_section("speed", "Speed and memory on her2st-6 (`benchmarks/speed.py`)", text)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "speed.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
