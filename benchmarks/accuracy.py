"""Benchmark: accuracy on her2st-6 of baselines, the comparison models and gnnst ablations, every row from
the library's cross-validation (:func:`gnnst.eval.crossval.run_crossval`) on the same folds, gene panels,
normalisation and embeddings.

    python benchmarks/accuracy.py [--suite main|shift] [--cache-dir /tmp/gcache] [--jobs 2] [--resume]
                                  [--budget-min M] [--methods ...] [--only-folds ...] [--no-write] [KEY=VALUE ...]

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

``--suite shift`` (issue 15, slide-to-slide shift) runs only the rows of the ``features`` corrections, for
gnnst (ens 1) and the ridge baselines: none / slide standardisation / Macenko stain normalisation / stain
augmentation (:data:`SHIFT`), then each family's combination of the corrections that raised its INNER
VALIDATION score (the training slides' validation blocks, never a held-out slide), and writes the section
``accuracy_shift`` (and ``results/accuracy_shift.json``) on its own, in its own ``--workdir``
(default ``runs/bench_accuracy_shift``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # the gnnst of this checkout, whatever is installed

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

# --suite shift (issue 15): setting -> (label, features overrides); each for gnnst (ens 1) and the ridge baselines
SHIFT = {
    "none": ("none", {}),
    "standardize": ("slide standardisation", {"slide_norm": "standardize"}),
    "macenko": ("stain normalisation (Macenko)", {"stain_norm": "macenko"}),
    "augment": ("stain augmentation (2 HED views)", {"stain_augment": 2}),
}
_OFF = {"slide_norm": "none", "stain_norm": "none", "stain_augment": 0}  # every correction off


def shift_features(*settings: str) -> list[str]:
    """The ``features`` overrides of one or several :data:`SHIFT` settings together; every key is set, so
    the rows do not depend on the shipped defaults (``features.stain_norm`` is ``macenko`` by default)."""
    merged = dict(_OFF)
    for st in settings:
        merged.update(SHIFT[st][1])
    return [f"features.{k}={v}" for k, v in merged.items()]


SHIFT_FAMILIES = {  # family -> (own overrides, trains the model, rows it gives: (row key, label))
    "gnnst": (["eval.baselines=[]", "train.ensemble=1"], True, [("model", "gnnst (ens 1)")]),
    "ridge": (["eval.baselines=[ridge, ridge_neighbours]"], False,
              [("ridge", "ridge"), ("ridge_neighbours", "ridge + neighbour mean")]),
}

log = logging.getLogger("gnnst")


def run_name(method: str) -> str:
    """The run (folder) a row comes from."""
    return BASELINES if METHODS[method][1] is None else method


def run_spec(run: str) -> tuple[list[str], bool]:
    """``(overrides, trains the model)`` of one run of the main table."""
    if run == BASELINES:
        return ["eval.baselines=[mean, ridge, ridge_neighbours]"], False
    return ["eval.baselines=[]"] + METHODS[run][1], True


def shift_spec(family: str, features: list[str]) -> tuple[list[str], bool]:
    """``(overrides, trains the model)`` of one run of the shift suite."""
    own, fit_model, _ = SHIFT_FAMILIES[family]
    return own + list(features), fit_model


def run_config(spec: tuple[list[str], bool], cache_dir: str | None, overrides: list[str]):
    """The config of one run: configs/her2st.yaml, the run's overrides (``spec``), then the user's."""
    from gnnst.config import load_config

    extra = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    return load_config(REPO / "configs" / "her2st.yaml", COMMON + list(spec[0]) + extra + list(overrides))


# ---------------------------------------------------------------------------------------- tasks
_WORKER: dict = {}  # per process: the slides read and embedded once


def _init_worker(cache_dir: str | None, overrides: list[str], threads: int | None) -> None:
    from gnnst.data.encoders import set_cpu_threads
    from gnnst.graph.dataset import load_and_embed

    logging.getLogger("gnnst").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    _WORKER.update(loaded=load_and_embed(run_config(run_spec(BASELINES), cache_dir, overrides), progress=False),
                   load_seconds=time.perf_counter() - t0, cache_dir=cache_dir, overrides=list(overrides))
    set_cpu_threads(threads)


def _run(run: str, spec: tuple[list[str], bool], workdir: Path, folds: list[str] | None, *, tasks: bool = True
         ) -> dict:
    """``run_crossval`` of one run (``spec``: :func:`run_spec`) on ``folds`` (all when ``None``) in
    ``workdir/<run>``, reusing what is there; with the worker's slides."""
    from gnnst.config import Config, _from_dict, _merge, config_to_dict, parse_overrides
    from gnnst.eval.crossval import run_crossval

    cfg = run_config(spec, _WORKER["cache_dir"], _WORKER["overrides"])
    if folds is not None:
        cfg = _from_dict(Config, _merge(config_to_dict(cfg), parse_overrides([f"eval.only_folds=[{', '.join(folds)}]"])))
    t0 = time.perf_counter()
    m = run_crossval(cfg, workdir / run, resume=True, progress=False, loaded=_WORKER["loaded"], fit_model=spec[1])
    if tasks:
        print(f"  {run:22s} {'+'.join(folds or ['all'])}: {time.perf_counter() - t0:6.1f} s", flush=True)
    return m


def run_tasks(specs: dict, only_folds: list[str] | None, jobs: int, workdir: Path, t_all: float,
              budget_min: float | None, fold_major: Sequence[str] = ()) -> tuple[dict, list, int, int]:
    """Every (run, fold) of ``specs`` (run -> :func:`run_spec`) not finished in ``workdir``, ``jobs`` at a time
    in worker processes of ``cores // jobs`` torch threads (``jobs=1``: here, all cores); then each complete
    run's summary across folds (the library's resume: finished folds are reused). Runs start in the order of
    ``specs``, all folds of one after the other, except the runs in ``fold_major``, which come last fold by
    fold (a run cut short then has the same folds of each). A task that fails is reported and its run left
    unfinished. Returns ``(metrics of the complete runs, folds, reused, computed)``; no task starts after
    ``budget_min`` minutes from ``t_all``."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from gnnst.eval.crossval import select_folds
    from gnnst.eval.splits import make_folds

    loaded = _WORKER["loaded"]
    base = run_config(run_spec(BASELINES), _WORKER["cache_dir"], _WORKER["overrides"])
    folds = select_folds(make_folds(loaded.patients(), mode=base.eval.folds), only_folds)
    tasks = [(r, f.name) for r in specs if r not in fold_major for f in folds] + \
        [(r, f.name) for f in folds for r in specs if r in fold_major]
    todo = [(r, f) for r, f in tasks if not (workdir / r / "folds" / f / "result.json").is_file()]
    n_reused = len(specs) * len(folds) - len(todo)
    if n_reused:
        print(f"reusing {n_reused} finished (run, fold) results in {workdir}", flush=True)

    def over_budget() -> bool:
        return budget_min is not None and time.perf_counter() - t_all > 60 * budget_min

    def done(fut, task) -> None:
        try:
            fut.result() if fut is not None else None
        except Exception as e:  # noqa: BLE001 - one failed task leaves its run unfinished, not the others
            print(f"  {task[0]} {task[1]}: FAILED: {type(e).__name__}: {e}", flush=True)

    if jobs == 1:
        for r, f in todo:
            if over_budget():
                break
            try:
                _run(r, specs[r], workdir, [f])
            except Exception as e:  # noqa: BLE001
                print(f"  {r} {f}: FAILED: {type(e).__name__}: {e}", flush=True)
    elif todo:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(_WORKER["cache_dir"], _WORKER["overrides"], _WORKER["threads"])) as pool:
            queue, pending = list(todo), {}
            while queue or pending:
                while queue and len(pending) < jobs and not over_budget():
                    r, f = queue.pop(0)
                    pending[pool.submit(_run, r, specs[r], workdir, [f])] = (r, f)
                if not pending:
                    break
                finished, _ = wait(set(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(fut, pending.pop(fut))
    complete = [r for r in specs if all((workdir / r / "folds" / f.name / "result.json").is_file() for f in folds)]
    metrics = {r: _run(r, specs[r], workdir, [f.name for f in folds] if only_folds else None, tasks=False)
               for r in complete}
    return metrics, folds, n_reused, len(todo)


def _start(cache_dir: str | None, overrides: list[str], jobs: int) -> None:
    """This process reads and embeds the slides once; workers get ``cores // jobs`` threads."""
    cores = len(os.sched_getaffinity(0))
    threads = None if jobs == 1 else max(cores // jobs, 1)
    _init_worker(cache_dir, overrides, threads)
    _WORKER["threads"] = threads


def _common(metrics: dict, folds: list, t_all: float, jobs: int, n_reused: int, n_computed: int,
            overrides: list[str]) -> dict:
    loaded = _WORKER["loaded"]
    first = next(iter(metrics.values()), {})
    return {"folds": [f.to_dict() for f in folds], "load_seconds": _WORKER["load_seconds"],
            "seconds": time.perf_counter() - t_all, "jobs": jobs,
            "threads_per_job": _WORKER["threads"] or len(os.sched_getaffinity(0)),
            "n_spots": int(sum(a.n_obs for a in loaded.adatas.values())), "reused": n_reused, "computed": n_computed,
            "overrides": list(overrides), "definitions": first.get("definitions", {}),
            "eval": first.get("config", {}).get("eval", {})}


def run(cache_dir: str | None, methods: list[str], only_folds: list[str] | None, overrides: list[str],
        jobs: int = 1, workdir: Path = REPO / "runs" / "bench_accuracy", budget_min: float | None = None) -> dict:
    """Every run the selected rows need (:func:`run_tasks`); runs missing a fold are reported unfinished."""
    t_all = time.perf_counter()
    _start(cache_dir, overrides, jobs)
    runs = [r for r in RUN_ORDER if any(run_name(m) == r for m in methods)]
    metrics, folds, n_reused, n_computed = run_tasks({r: run_spec(r) for r in runs}, only_folds, jobs, workdir,
                                                     t_all, budget_min)
    rows = [m for m in methods if run_name(m) in metrics]
    unfinished = {m: sum((workdir / run_name(m) / "folds" / f.name / "result.json").is_file() for f in folds)
                  for m in methods if m not in rows}
    return {"summary": {m: row_summary(m, metrics[run_name(m)]) for m in rows}, "methods": rows,
            "unfinished": unfinished, **_common(metrics, folds, t_all, jobs, n_reused, n_computed, overrides)}


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


# ---------------------------------------------------------------------------------------- shift suite
def shift_run(family: str, setting: str) -> str:
    return f"{family}_{setting}"


def shift_rows(family: str, setting: str, m: dict) -> dict:
    """The rows of one shift-suite run (row key -> figures): all folds, the patient-disjoint folds, per held-out
    slide, and the inner validation score per fold (``val_pcc_ensemble`` of the model; ``val_pcc`` of a
    baseline: the training slides' validation blocks)."""
    out = {}
    for key, label in SHIFT_FAMILIES[family][2]:
        b = None if key == "model" else key
        per_slide, val, seconds = {}, {}, 0.0
        for f in m["folds"]:
            block = f["baselines"][b] if b else f
            per_slide.update({s: {k: v for k, v in sc.items() if k != "pcc_per_gene"}
                              for s, sc in block["per_slide"].items()})
            val[f["name"]] = block.get("val_pcc") if b else f.get("val_pcc_ensemble")
            seconds += block.get("seconds", 0.0) if b else f["fold_seconds"]
        row = dict(m["baselines"][b] if b else m["summary"])
        disjoint = (m.get("baselines_patient_disjoint") or {}).get(b) if b else m.get("summary_patient_disjoint")
        row.update(patient_disjoint=disjoint,
                   per_slide=per_slide, val_per_fold=val, seconds=seconds, label=label, setting=setting,
                   features=m["config"]["features"])
        vals = [v for v in val.values() if v is not None and np.isfinite(v)]
        row["val_pcc"] = float(np.mean(vals)) if len(vals) == len(val) else float("nan")
        out[key] = row
    return out


def _family_val(rows: dict, family: str) -> float:
    """One number per family and setting for choosing its combination: the mean inner validation of its rows."""
    return float(np.mean([rows[k]["val_pcc"] for k, _ in SHIFT_FAMILIES[family][2]]))


def run_shift(cache_dir: str | None, only_folds: list[str] | None, overrides: list[str], jobs: int, workdir: Path,
              budget_min: float | None, families: list[str] | None = None) -> dict:
    """The shift suite: every (family, setting) of :data:`SHIFT`, then per family the combination of the
    corrections whose inner validation beat ``none`` (run only when that is two or more of them).
    ``families``: only these of :data:`SHIFT_FAMILIES` (default all)."""
    t_all = time.perf_counter()
    _start(cache_dir, overrides, jobs)
    families = list(families or SHIFT_FAMILIES)
    specs = {shift_run(fam, st): shift_spec(fam, shift_features(st)) for fam in families for st in SHIFT}
    # fold by fold, gnnst first: a run cut short by the budget compares every row on the same folds
    metrics, folds, n_reused, n_computed = run_tasks(specs, only_folds, jobs, workdir, t_all, budget_min,
                                                     fold_major=list(specs))
    partial = {}  # family -> the folds every one of its runs finished, when some run is unfinished
    for fam in families:
        runs = [shift_run(fam, st) for st in SHIFT]
        if all(r in metrics for r in runs):
            continue
        common = [f.name for f in folds if all((workdir / r / "folds" / f.name / "result.json").is_file() for r in runs)]
        if common:  # every setting of the family summarised on the same folds, reported as partial
            partial[fam] = common
            metrics.update({r: _run(r, specs[r], workdir, common, tasks=False) for r in runs})
    rows = {(fam, st): shift_rows(fam, st, metrics[shift_run(fam, st)]) for fam in families for st in SHIFT
            if shift_run(fam, st) in metrics}
    combos = {}
    for fam in families:
        if fam in partial or not all((fam, st) in rows for st in SHIFT):
            continue
        ref = _family_val(rows[(fam, "none")], fam)
        better = [st for st in SHIFT if st != "none" and _family_val(rows[(fam, st)], fam) > ref]
        combos[fam] = better
        if len(better) >= 2:
            spec = shift_spec(fam, shift_features(*better))
            m2, *_, c2 = run_tasks({shift_run(fam, "best"): spec}, only_folds, jobs, workdir, t_all, budget_min)
            n_computed += c2
            if m2:
                rows[(fam, "best")] = shift_rows(fam, "best", m2[shift_run(fam, "best")])
    unfinished = [shift_run(fam, st) for fam in families for st in SHIFT
                  if (fam, st) not in rows or fam in partial]
    return {"rows": {f"{fam}_{st}_{k}": v for (fam, st), rr in rows.items() for k, v in rr.items()},
            "combinations": combos, "unfinished": unfinished, "partial": partial,
            **_common(metrics, folds, t_all, jobs, n_reused, n_computed, overrides)}


def _setting_label(row: dict, combos: dict, family: str) -> str:
    if row["setting"] != "best":
        return SHIFT[row["setting"]][0]
    return "combination: " + " + ".join(SHIFT[st][0] for st in combos[family])


def format_shift(r: dict) -> str:
    """The shift suite's tables: all folds with the inner validation; the patient-disjoint fold on its own."""
    from gnnst.metrics import MetricSet

    ev = r["eval"]
    ms = MetricSet(n_heg=ev.get("n_heg", 50), n_hvg=ev.get("n_hvg", 50), hvg=ev.get("hvg", "seurat"))
    rows, combos = r["rows"], r["combinations"]
    order = [(fam, st, k) for fam in SHIFT_FAMILIES for k, _ in SHIFT_FAMILIES[fam][2] for st in [*SHIFT, "best"]
             if f"{fam}_{st}_{k}" in rows]
    cols = ["pcc_heg_per_slide", "pcc_all_per_slide", "pcc_heg_pooled", "pcc_all_pooled"]
    n = len(r["folds"])
    lines = [f"**All {n} folds**: inner validation = mean over the folds of the PCC on the validation blocks of the "
             "training slides (what a default may be chosen on); the other columns score the held-out slides.", "",
             "| model | features | inner validation PCC | folds better than none (inner) | "
             + " | ".join(ms.label(c) for c in cols) + " | time (s) |", "|---" * (len(cols) + 5) + "|"]
    for fam, st, k in order:
        row, none = rows[f"{fam}_{st}_{k}"], rows.get(f"{fam}_none_{k}")
        nf = len(row["val_per_fold"])
        wins = "—" if st == "none" or none is None else \
            f"{sum(row['val_per_fold'][f] > none['val_per_fold'][f] for f in row['val_per_fold'])}/{nf}"
        label = row["label"] + (f" (PARTIAL: folds {', '.join(row['val_per_fold'])})" if fam in r["partial"] else "")
        lines.append(f"| {label} | {_setting_label(row, combos, fam)} | {_f(row['val_pcc'])} | {wins} | "
                     + " | ".join(_f(row.get(c)) for c in cols) + f" | {row['seconds']:.0f} |")
    lines += ["", "**Patient-disjoint fold only** (B4 on her2st-6: patient B, trained on patient C's five slides):", "",
              "| model | features | inner validation PCC (this fold) | " + " | ".join(
                  ms.label(c) for c in ["pcc_heg_per_slide", "pcc_hvg_per_slide", "pcc_all_per_slide"]) + " |",
              "|---" * 6 + "|"]
    pd_folds = [f["name"] for f in r["folds"] if f.get("patient_disjoint")]
    for fam, st, k in order:
        row = rows[f"{fam}_{st}_{k}"]
        d = row.get("patient_disjoint") or {}
        v = np.mean([row["val_per_fold"][f] for f in pd_folds if f in row["val_per_fold"]] or [np.nan])
        lines.append(f"| {row['label']} | {_setting_label(row, combos, fam)} | {_f(v)} | "
                     + " | ".join(_f(d.get(c)) for c in ["pcc_heg_per_slide", "pcc_hvg_per_slide", "pcc_all_per_slide"])
                     + " |")
    return "\n".join(lines)


def shift_notes(r: dict) -> str:
    defs = r.get("definitions", {})
    out = [
        f"- {r['n_spots']} spots, {len(r['folds'])} folds, every row through the library's cross-validation with "
        "`configs/her2st.yaml` and the `features` overrides of `benchmarks/accuracy.py` (`SHIFT`); gnnst rows train "
        "one model per fold (`train.ensemble=1`): its `none` row is the main table's \"gnnst, full (ens 1)\" config.",
        "- Each correction reads a slide's own images only: slide standardisation = each embedding dimension "
        "minus the slide's own mean over its own sd; Macenko = the slide's stain (estimated on its own patches' "
        "pixels) mapped to a reference estimated on the fold's TRAINING slides (re-embedded and cached per fold); "
        "stain augmentation = 2 HED-jittered embeddings per training spot, one view per spot drawn each epoch "
        "(baselines: the views are extra training rows); validation and held-out slides see view 0 only.",
        "- Inner validation: `val_pcc_ensemble` of the fold's model, `baseline_validation_score` of a baseline "
        "(fitted on the training parts, scored on the same validation blocks of the training slides); held-out "
        "slides play no part in it.",
        "- Combination: per family, the corrections whose mean inner validation beat `none`, run together when "
        "there are two or more (" + ("; ".join(f"{fam}: {', '.join(b) or 'none beat it'}"
                                               for fam, b in r["combinations"].items())
                                     or "not chosen: the settings' runs are unfinished") + ").",
        "- Definitions (from `metrics.json`): " + "; ".join(
            f"{v['label']}: {v['definition']}" for k, v in defs.get("metrics", {}).items()
            if k in ("pcc_heg_per_slide", "pcc_heg_pooled")) + ".",
        "- `time` = wall seconds summed over the folds (re-embedding of stain-normalised or augmented patches "
        f"included where that fold computed them); tasks ran {r['jobs']} at a time with {r['threads_per_job']} "
        "torch thread(s) each.",
    ]
    unfinished = ("(rows left out): " + ", ".join(r["unfinished"]) + ". `--suite shift --resume` completes them."
                  if r["unfinished"] else None)
    return "\n".join(out + _run_notes(r, unfinished))


def _run_notes(r: dict, unfinished: str | None) -> list[str]:
    """The closing notes of a table: what did not finish (``unfinished``: the rest of that sentence), what
    earlier invocations computed, how long this one took."""
    out = [f"- Not finished within the run's time budget {unfinished}"] if unfinished else []
    if r["reused"]:
        out.append(f"- {r['reused']} of the (run, fold) results were computed by earlier invocations of this "
                   "script and reused (`--resume`).")
    out.append(f"- This invocation: {r['seconds'] / 60:.1f} min on this machine.")
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
    unfinished = (f"(rows left out; folds done of {len(r['folds'])}): "
                  + ", ".join(f"{METHODS[m][0]} ({k})" for m, k in r["unfinished"].items())
                  + ". `--resume` completes them." if r["unfinished"] else None)
    return "\n".join(out + _run_notes(r, unfinished))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["main", "shift"], default="main",
                   help="main: the accuracy table; shift: the slide-shift rows (issue 15), their own section")
    p.add_argument("--cache-dir", default=None, help="embedding cache (data.cache_dir); a warm one saves encoding")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--families", nargs="+", default=list(SHIFT_FAMILIES), choices=list(SHIFT_FAMILIES),
                   help="--suite shift: only these families' rows (a partial run: RESULTS.md is not updated)")
    p.add_argument("--only-folds", "--folds", dest="folds", nargs="+", default=None,
                   help="only these folds (names or test slide ids); default all")
    p.add_argument("--jobs", type=int, default=1, help="tasks run at once, in worker processes sharing the cores")
    p.add_argument("--workdir", default=None,
                   help="the runs are kept here (default runs/bench_accuracy, runs/bench_accuracy_shift)")
    p.add_argument("--resume", action="store_true", help="reuse the runs in --workdir (else it is emptied first)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no task after this many minutes; unfinished rows are reported as such")
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--note", default="", help="a remark recorded with the table (e.g. a shared machine)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every row (e.g. train.epochs=5)")
    args = p.parse_args(argv)
    logging.getLogger("gnnst").setLevel(logging.WARNING)
    load_before = os.getloadavg()
    shift = args.suite == "shift"
    workdir = Path(args.workdir or REPO / "runs" / ("bench_accuracy_shift" if shift else "bench_accuracy"))
    if not args.resume and workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    if shift:
        r = run_shift(args.cache_dir, args.folds, args.overrides, args.jobs, workdir, args.budget_min, args.families)
    else:
        r = run(args.cache_dir, args.methods, args.folds, args.overrides, args.jobs, workdir, args.budget_min)
    r["loadavg_before"], r["loadavg_after"] = load_before, os.getloadavg()
    text = (format_shift(r) + "\n\n" + shift_notes(r)) if shift else format_tables(r) + "\n\n" + notes(r)
    text += (f"\n- Load average (1/5/15 min) before {', '.join(f'{v:.1f}' for v in r['loadavg_before'])}, after "
             f"{', '.join(f'{v:.1f}' for v in r['loadavg_after'])}: the machine is shared with other developers' "
             "jobs, so times may be inflated (accuracy figures are not affected).")
    if args.note:
        text += f"\n- Note: {args.note}"
    print(machine_info())
    print(text)
    partial = args.folds or args.overrides or (args.methods != list(METHODS) and not shift) or r["unfinished"] or (
        shift and args.families != list(SHIFT_FAMILIES))
    key, title = ("accuracy_shift", "Slide-to-slide shift on her2st-6 (`benchmarks/accuracy.py --suite shift`)") \
        if shift else ("accuracy", "Accuracy on her2st-6 (`benchmarks/accuracy.py`)")
    if not args.no_write and not partial:
        write_section(key, title, text)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"{key}.json").write_text(json.dumps(r, indent=2, default=float) + "\n")
    elif not args.no_write:
        print("(partial run: RESULTS.md not updated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
