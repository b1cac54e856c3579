"""Benchmark: accuracy on her2st-6 of baselines, the comparison models and gnnst ablations, every row from
the library's cross-validation (:func:`gnnst.eval.crossval.run_crossval`) on the same folds, gene panels,
normalisation and embeddings.

    python benchmarks/accuracy.py [--cache-dir /tmp/gcache] [--jobs 2] [--resume] [--budget-min M]
                                  [--methods ...] [--only-folds ...] [--no-write] [KEY=VALUE ...]

Each row is one config of ``gnnst train`` (:data:`METHODS`: overrides of ``configs/her2st.yaml``); the
baseline rows (mean of training spots, ridge, ridge + neighbour mean) are the ``eval.baselines`` of one
baselines-only run. This script holds no training or scoring code: the figures, their definitions and
the pooled column come from :mod:`gnnst.metrics` through the runs' ``metrics.json``. The LEAKY row is the
library's ``eval.select_on_heldout=true`` switch (gene panel and reported subsets chosen on all six
slides including the held-out one; early stopping, checkpoint and blend chosen on the held-out slide).

Runs are written to ``--workdir/<method>/`` (a ``gnnst train`` output folder each, per-member checkpoints
kept for ``--resume``). Tasks are (method, fold) pairs, ``--jobs`` at a time in worker processes that
read and embed the slides once each; a run cut short (``--budget-min``, an interruption) is completed
with ``--resume``, which is the library's own resume. Prints its tables, writes the section ``accuracy``
of ``benchmarks/RESULTS.md`` and ``benchmarks/results/accuracy.json`` (only for a complete default run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _results import machine_info, write_section  # noqa: E402

BASELINES = "baselines"  # the run holding the baseline rows
COMMON = ["eval.final_model=false", "eval.figures=false"]  # every run: a comparison, no model to ship
# row -> (table label, config overrides of the run it comes from); baseline rows come from the BASELINES run
METHODS = {
    "mean": ("mean of training spots", None),
    "ridge": ("ridge (PCA 256 + ridge, HEST-Benchmark)", None),
    "ridge_neighbours": ("ridge + neighbour mean (no learning on the graph)", None),
    "bleep": ("BLEEP-style retrieval (k=50, mean)", ["model.name=bleep", "train.ensemble=1"]),
    "mclstexp": ("mclSTExp-style retrieval (k=50, 1/d weights)", ["model.name=mclstexp", "train.ensemble=1"]),
    "gnnst_no_graph": ("gnnst, no graph (ens 1)", ["model.use_graph=false", "train.ensemble=1"]),
    "gnnst_no_contrastive": ("gnnst, no contrastive (ens 1)", ["model.use_contrastive=false", "train.ensemble=1"]),
    "gnnst_no_nbhd": ("gnnst, no neighbourhood scale (ens 1)", ["model.use_neighbourhood_scale=false",
                                                                "train.ensemble=1"]),
    "gnnst_masked_recon": ("gnnst, with masked reconstruction (CMRCNet-style, ens 1)",
                           ["model.use_masked_recon=true", "train.ensemble=1"]),
    "gnnst_full_e1": ("gnnst, full (ens 1)", ["train.ensemble=1"]),
    "gnnst": ("gnnst, full (defaults, ens 3)", []),
    "gnnst_leaky_e1": ("gnnst, full, LEAKY protocol (ens 1)", ["eval.select_on_heldout=true", "train.ensemble=1"]),
}
# the order the runs' tasks start in: cheap and central rows first, so that a run cut short by --budget-min
# still gives complete rows (the table keeps the order of METHODS)
RUN_ORDER = (BASELINES, "gnnst_full_e1", "bleep", "mclstexp", "gnnst_leaky_e1", "gnnst_no_graph",
             "gnnst_no_contrastive", "gnnst_no_nbhd", "gnnst_masked_recon", "gnnst")

log = logging.getLogger("gnnst")


def run_name(method: str) -> str:
    """The run (folder) a row comes from."""
    return BASELINES if METHODS[method][1] is None else method


def run_config(run: str, cache_dir: str | None, overrides: list[str]):
    """The config of one run: configs/her2st.yaml, the run's overrides, then the user's."""
    from gnnst.config import load_config

    own = ["eval.baselines=[mean, ridge, ridge_neighbours]"] if run == BASELINES else \
        ["eval.baselines=[]"] + METHODS[run][1]
    extra = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    return load_config(REPO / "configs" / "her2st.yaml", COMMON + own + extra + list(overrides))


# ---------------------------------------------------------------------------------------- tasks
_WORKER: dict = {}  # per process: the slides read and embedded once


def _init_worker(cache_dir: str | None, overrides: list[str], threads: int | None) -> None:
    from gnnst.data.encoders import set_cpu_threads
    from gnnst.graph.dataset import load_and_embed

    logging.getLogger("gnnst").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    _WORKER.update(loaded=load_and_embed(run_config(BASELINES, cache_dir, overrides), progress=False),
                   load_seconds=time.perf_counter() - t0, cache_dir=cache_dir, overrides=list(overrides))
    set_cpu_threads(threads)


def _run(run: str, workdir: Path, folds: list[str] | None, *, tasks: bool = True) -> dict:
    """``run_crossval`` of one run on ``folds`` (all when ``None``) in ``workdir/<run>``, reusing what is
    there; with the worker's slides."""
    from gnnst.config import Config, _from_dict, _merge, config_to_dict, parse_overrides
    from gnnst.eval.crossval import run_crossval

    cfg = run_config(run, _WORKER["cache_dir"], _WORKER["overrides"])
    if folds is not None:
        cfg = _from_dict(Config, _merge(config_to_dict(cfg), parse_overrides([f"eval.only_folds=[{', '.join(folds)}]"])))
    t0 = time.perf_counter()
    m = run_crossval(cfg, workdir / run, resume=True, progress=False, loaded=_WORKER["loaded"],
                     fit_model=run != BASELINES)
    if tasks:
        print(f"  {run:22s} {'+'.join(folds or ['all'])}: {time.perf_counter() - t0:6.1f} s", flush=True)
    return m


def run(cache_dir: str | None, methods: list[str], only_folds: list[str] | None, overrides: list[str],
        jobs: int = 1, workdir: Path = REPO / "runs" / "bench_accuracy", budget_min: float | None = None) -> dict:
    """Every run the selected rows need, fold by fold (``jobs`` at a time in worker processes of
    ``cores // jobs`` torch threads; ``jobs=1``: here, all cores), then each run's summary across folds
    (the library's resume: finished folds are reused). Runs missing a fold are reported unfinished."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from gnnst.eval.crossval import select_folds
    from gnnst.eval.splits import make_folds

    cores = len(os.sched_getaffinity(0))
    threads = None if jobs == 1 else max(cores // jobs, 1)
    t_all = time.perf_counter()
    _init_worker(cache_dir, overrides, threads)
    loaded = _WORKER["loaded"]
    base = run_config(BASELINES, cache_dir, overrides)
    folds = select_folds(make_folds(loaded.patients(), mode=base.eval.folds), only_folds)
    runs = [r for r in RUN_ORDER if any(run_name(m) == r for m in methods)]
    todo = [(r, f.name) for r in runs for f in folds
            if not (workdir / r / "folds" / f.name / "result.json").is_file()]
    n_reused = len(runs) * len(folds) - len(todo)
    if n_reused:
        print(f"reusing {n_reused} finished (run, fold) results in {workdir}", flush=True)

    def over_budget() -> bool:
        return budget_min is not None and time.perf_counter() - t_all > 60 * budget_min

    if jobs == 1:
        for r, f in todo:
            if over_budget():
                break
            _run(r, workdir, [f])
    elif todo:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(cache_dir, overrides, threads)) as pool:
            queue, pending = list(todo), set()
            while queue or pending:
                while queue and len(pending) < jobs and not over_budget():
                    r, f = queue.pop(0)
                    pending.add(pool.submit(_run, r, workdir, [f]))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    fut.result()
    complete = [r for r in runs if all((workdir / r / "folds" / f.name / "result.json").is_file() for f in folds)]
    metrics = {r: _run(r, workdir, [f.name for f in folds] if only_folds else None, tasks=False) for r in complete}
    rows = [m for m in methods if run_name(m) in metrics]
    unfinished = {m: sum((workdir / run_name(m) / "folds" / f.name / "result.json").is_file() for f in folds)
                  for m in methods if m not in rows}
    return {"summary": {m: row_summary(m, metrics[run_name(m)]) for m in rows}, "folds": [f.to_dict() for f in folds],
            "load_seconds": _WORKER["load_seconds"], "seconds": time.perf_counter() - t_all, "jobs": jobs,
            "threads_per_job": threads or cores, "n_spots": int(sum(a.n_obs for a in loaded.adatas.values())),
            "methods": rows, "unfinished": unfinished, "reused": n_reused, "computed": len(todo),
            "overrides": list(overrides), "definitions": next(iter(metrics.values()))["definitions"] if metrics else {},
            "eval": next(iter(metrics.values()))["config"]["eval"] if metrics else {}}


def row_summary(method: str, m: dict) -> dict:
    """One row's figures from its run's metrics.json: all folds, patient-disjoint folds, per held-out slide."""
    b = method if run_name(method) == BASELINES else None
    per_slide, seconds = {}, 0.0
    for f in m["folds"]:
        block = f["baselines"][b] if b else f
        per_slide.update({s: {k: v for k, v in sc.items() if k != "pcc_per_gene"} for s, sc in block["per_slide"].items()})
        seconds += block.get("seconds", 0.0) if b else f["fold_seconds"]
    out = dict(m["baselines"][b] if b else m["summary"])
    out["patient_disjoint"] = m["baselines_patient_disjoint"][b] if b else m["summary_patient_disjoint"]
    out.update(per_slide=per_slide, seconds=seconds, protocol=m["protocol"])
    out["details"] = [] if b else [{k: f.get(k) for k in ("name", "best_epochs", "blend_alpha", "train_seconds",
                                                          "fold_seconds")} for f in m["folds"]]
    return out


# ---------------------------------------------------------------------------------------- tables
def _f(v, nd: int = 3) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def format_tables(r: dict) -> str:
    from gnnst.metrics import BENCHMARK_COLUMNS, MetricSet

    ev = r["eval"]
    ms = MetricSet(n_heg=ev.get("n_heg", 50), n_hvg=ev.get("n_hvg", 50), hvg=ev.get("hvg", "seurat"))
    S, methods = r["summary"], r["methods"]
    per_slide_cols = [k for k in BENCHMARK_COLUMNS if k.endswith("_per_slide")]
    n = len(r["folds"])
    head = "| method | " + " | ".join(ms.label(k) for k in BENCHMARK_COLUMNS) + " | time (s) |"
    lines = [f"**All {n} folds** (columns and definitions: `gnnst.metrics`; pooled on "
             + ", ".join(f"{c} {ms.subset_label(k)}" for k, c in
                         next(iter(S.values()), {}).get("n_genes_pooled", {}).items())
             + " genes in every fold's subset):", "", head, "|---" * (len(BENCHMARK_COLUMNS) + 2) + "|"]
    for m in methods:
        s = S[m]
        lines.append(f"| {METHODS[m][0]} | " + " | ".join(_f(s.get(k), 4 if k in ("mse", "mae") else 3)
                                                       for k in BENCHMARK_COLUMNS) + f" | {s['seconds']:.0f} |")
    lines += ["", "**Patient-disjoint folds only** (B4 on her2st-6: patient B, trained on patient C's five slides):", "",
              "| method | " + " | ".join(ms.label(k) for k in per_slide_cols + ["mse", "mae"]) + " |",
              "|---" * (len(per_slide_cols) + 3) + "|"]
    for m in methods:
        d = S[m].get("patient_disjoint")
        if d:
            lines.append(f"| {METHODS[m][0]} | " + " | ".join(_f(d.get(k)) for k in per_slide_cols)
                         + f" | {_f(d.get('mse'), 4)} | {_f(d.get('mae'), 4)} |")
    slides = sorted({s for m in methods for s in S[m]["per_slide"]})
    lines += ["", f"**{ms.label('pcc_heg_per_slide')} by held-out slide:**", "", "| method | " + " | ".join(slides) + " |",
              "|---" * (len(slides) + 1) + "|"]
    for m in methods:
        lines.append(f"| {METHODS[m][0]} | " + " | ".join(_f(S[m]["per_slide"].get(s, {}).get("pcc_heg", np.nan))
                                                          for s in slides) + " |")
    return "\n".join(lines)


def notes(r: dict) -> str:
    S = r["summary"]
    defs = r.get("definitions", {})
    out = [
        f"- {r['n_spots']} spots, {len(r['folds'])} folds; embeddings (efficientnet_lite0, 150 µm patches) read "
        f"once per process ({r['load_seconds']:.1f} s) and shared by every row; per fold every row uses the same "
        "gene panel (chosen on the training slides), the same normalisation (normalize_total + log1p) and, where "
        "a model is trained, the same validation blocks, standardisation, epochs (60), patience (15), learning "
        "rate and seed (0): each row is `gnnst train` with the overrides in `benchmarks/accuracy.py`.",
        "- Definitions (from `metrics.json`): " + "; ".join(
            f"{v['label']}: {v['definition']}" for k, v in defs.get("metrics", {}).items()
            if k in ("pcc_heg_per_slide", "pcc_heg_pooled")) + "; " + "; ".join(
            f"{v['label']}: {v['selection']}" for v in defs.get("subsets", {}).values()) + ".",
        "- `time` = wall seconds summed over the folds (models: training all members, validation passes, "
        "prediction and writing; baselines: fitting and predicting)"
        + (f"; tasks ran {r['jobs']} at a time with {r['threads_per_job']} torch thread(s) each." if r["computed"]
           else "."),
        "- Mean predictor: a constant per fold, so its per-slide PCC is undefined (—). Its pooled PCC is not: "
        "pooled across folds, the fold-wise training means still differ, so pooled figures reward slide-level "
        "offsets; per-slide figures are the primary ones.",
        "- Ridge + neighbour mean: the same PCA 256 + ridge on [spot embedding, mean embedding of its graph "
        "neighbours] (graph.k=6), no learning on the graph: the bar any graph model has to clear.",
    ]
    if {"bleep", "mclstexp"} & set(S):
        out.append("- BLEEP-style and mclSTExp-style rows: `gnnst/models/bleep.py`, `gnnst/models/mclstexp.py` "
                   "(registered as `bleep`, `mclstexp`), written from the papers' descriptions; one model each, on "
                   "the same frozen patch embeddings as gnnst (the papers fine-tune a CNN image encoder), trained "
                   "with their own losses in the library's one training loop (tile batches of 512 spots without "
                   "halo, same epochs, patience and validation blocks), predicting by retrieval only.")
    if any(m.startswith("gnnst") for m in S):
        out.append("- Rows marked ens 1 train one model (seed 0) per fold instead of the default ensemble of 3, to "
                   "keep the run short; compare ablations with \"gnnst, full (ens 1)\"."
                   + (" The ens 3 row is what `gnnst train --config configs/her2st.yaml` runs." if "gnnst" in S
                      else ""))
    if "gnnst_leaky_e1" in S and "gnnst_full_e1" in S:
        lk, h = S["gnnst_leaky_e1"], S["gnnst_full_e1"]
        out.append("- LEAKY row (not a valid result, shown for comparison with published numbers): "
                   f"`eval.select_on_heldout=true`, {lk['protocol']}. PCC per slide (top HEG) "
                   f"{_f(lk['pcc_heg_per_slide'])} vs {_f(h['pcc_heg_per_slide'])} honest "
                   f"({lk['pcc_heg_per_slide'] - h['pcc_heg_per_slide']:+.3f}).")
    if r["unfinished"]:
        out.append("- Not finished within the run's time budget (rows left out; folds done of "
                   f"{len(r['folds'])}): " + ", ".join(f"{METHODS[m][0]} ({k})" for m, k in r["unfinished"].items())
                   + ". `--resume` completes them.")
    if r["reused"]:
        out.append(f"- {r['reused']} of the (run, fold) results were computed by earlier invocations of this "
                   "script and reused (`--resume`).")
    out.append(f"- This invocation: {r['seconds'] / 60:.1f} min on this machine.")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=None, help="embedding cache (data.cache_dir); a warm one saves encoding")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--only-folds", "--folds", dest="folds", nargs="+", default=None,
                   help="only these folds (names or test slide ids); default all")
    p.add_argument("--jobs", type=int, default=1, help="tasks run at once, in worker processes sharing the cores")
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench_accuracy"), help="the runs are kept here")
    p.add_argument("--resume", action="store_true", help="reuse the runs in --workdir (else it is emptied first)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no task after this many minutes; unfinished rows are reported as such")
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--note", default="", help="a remark recorded with the table (e.g. a shared machine)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every row (e.g. train.epochs=5)")
    args = p.parse_args(argv)
    logging.getLogger("gnnst").setLevel(logging.WARNING)
    load_before = os.getloadavg()
    workdir = Path(args.workdir)
    if not args.resume and workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    r = run(args.cache_dir, args.methods, args.folds, args.overrides, args.jobs, workdir, args.budget_min)
    r["loadavg_before"], r["loadavg_after"] = load_before, os.getloadavg()
    text = format_tables(r) + "\n\n" + notes(r)
    text += (f"\n- Load average (1/5/15 min) before {', '.join(f'{v:.1f}' for v in r['loadavg_before'])}, after "
             f"{', '.join(f'{v:.1f}' for v in r['loadavg_after'])}: the machine is shared with other developers' "
             "jobs, so times may be inflated (accuracy figures are not affected).")
    if args.note:
        text += f"\n- Note: {args.note}"
    print(machine_info())
    print(text)
    partial = args.folds or args.overrides or args.methods != list(METHODS) or r["unfinished"]
    if not args.no_write and not partial:
        write_section("accuracy", "Accuracy on her2st-6 (`benchmarks/accuracy.py`)", text)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "accuracy.json").write_text(json.dumps(r, indent=2, default=float) + "\n")
    elif not args.no_write:
        print("(partial run: RESULTS.md not updated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
