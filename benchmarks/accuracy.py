"""Benchmark: accuracy on her2st-6 of baselines, published-style models and gnnst ablations, on the
same folds, gene panels, normalisation and embeddings, in one run.

    python benchmarks/accuracy.py [--cache-dir /tmp/gcache] [--jobs 2] [--resume] [--budget-min M]
                                  [--methods ...] [--folds ...] [--no-write]

Honest protocol for every row but the LEAKY ones: per fold the gene panel (and the top-50 HEG/HVG
reported), the target standardisation and the validation split (early stopping, checkpoint and blend
choice) come from the training slides only; the held-out slide is predicted from its image side alone.
The LEAKY rows repeat full gnnst under the leaky protocol common in the literature: genes chosen on
all six slides, and the held-out slide used as the validation set (early stopping and the blend
look at it), so the gap to the honest row is what leakage buys.

Each (method, fold) result is kept in ``--workdir``; ``--resume`` reuses them, so a run cut short by
``--budget-min`` (or an interruption) is completed rather than redone.

Prints its tables, writes the section ``accuracy`` of ``benchmarks/RESULTS.md`` and the raw numbers
to ``benchmarks/results/accuracy.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _results import machine_info, write_section  # noqa: E402

SUBSETS = ("heg50", "hvg50", "all")
# name -> (table label, kind, config overrides)
METHODS = {
    "mean": ("mean of training spots", "mean", []),
    "ridge": ("ridge (PCA 256 + ridge, HEST-Benchmark)", "ridge", []),
    "bleep": ("BLEEP-style retrieval (k=50, mean)", "bleep", []),
    "mclstexp": ("mclSTExp-style retrieval (k=50, 1/d weights)", "mclstexp", []),
    "gnnst_no_graph": ("gnnst, no graph (ens 1)", "gnnst", ["model.use_graph=false", "train.ensemble=1"]),
    "gnnst_no_contrastive": ("gnnst, no contrastive (ens 1)", "gnnst", ["model.use_contrastive=false", "train.ensemble=1"]),
    "gnnst_no_nbhd": ("gnnst, no neighbourhood scale (ens 1)", "gnnst", ["model.use_neighbourhood_scale=false",
                                                                         "train.ensemble=1"]),
    "gnnst_full_e1": ("gnnst, full (ens 1)", "gnnst", ["train.ensemble=1"]),
    "gnnst": ("gnnst, full (defaults, ens 3)", "gnnst", []),
    "gnnst_leaky_e1": ("gnnst, full, LEAKY protocol (ens 1)", "leaky", ["train.ensemble=1"]),
    "gnnst_leaky": ("gnnst, full, LEAKY protocol (ens 3)", "leaky", []),
}
# the order the (method, fold) tasks run in: cheap and central rows first, so that a run cut short by
# --budget-min still gives complete rows (the table keeps the order of METHODS)
RUN_ORDER = ("mean", "ridge", "gnnst_full_e1", "bleep", "mclstexp", "gnnst_leaky_e1", "gnnst_no_graph",
             "gnnst_no_contrastive", "gnnst_no_nbhd", "gnnst", "gnnst_leaky")

log = logging.getLogger("gnnst")


# ---------------------------------------------------------------------------------------- folds
def prepare_fold(loaded, cfg, fold, *, leaky: bool = False) -> dict:
    """Everything a method sees of one fold, built exactly as ``gnnst train`` builds it.

    Honest: panel from the training slides; validation blocks carved from the training slides;
    standardisation from the training part. Leaky: panel from all slides; the full training slides
    train; the held-out slide (standardised with the training statistics) is the validation set.
    """
    from gnnst.data.expression import select_panel
    from gnnst.graph.dataset import make_graphs
    from gnnst.train.crossval import TargetScaler, _to_tensor_graph
    from gnnst.train.trainer import carve_validation, node_subgraph

    panel_slides = fold.train_slides + fold.test_slides if leaky else fold.train_slides
    panel = select_panel([loaded.adatas[s] for s in panel_slides], cfg.expression)
    graphs = make_graphs(loaded, cfg, panel, fold.train_slides + fold.test_slides)
    train_full = [graphs[s] for s in fold.train_slides]
    test_graphs = [graphs[s] for s in fold.test_slides]
    if leaky:
        train_parts = train_full
        scaler = TargetScaler(np.concatenate([g.y.numpy() for g in train_parts]))
        val_s = [_to_tensor_graph(g, scaler) for g in test_graphs]
        val_masks = [np.ones(g.num_nodes, dtype=bool) for g in test_graphs]
    else:
        val_masks = carve_validation(train_full, cfg.train.val_fraction, cfg.seed)
        train_parts = [node_subgraph(g, ~m) for g, m in zip(train_full, val_masks)]
        scaler = TargetScaler(np.concatenate([g.y.numpy() for g in train_parts]))
        val_s = [_to_tensor_graph(g, scaler) for g in train_full]
    train_s = [_to_tensor_graph(g, scaler) for g in train_parts]
    subsets = {"all": panel.genes, "heg50": panel.top("heg", cfg.eval.n_heg), "hvg50": panel.top("hvg", cfg.eval.n_hvg)}
    return {"fold": fold, "panel": panel, "graphs": graphs, "train_full": train_full, "train_s": train_s,
            "val_s": val_s, "val_masks": val_masks, "test_graphs": test_graphs, "scaler": scaler,
            "subsets": subsets, "y_test": {s: graphs[s].y.numpy() for s in fold.test_slides}}


# ---------------------------------------------------------------------------------------- methods
def fit_retrieval_model(model, fd: dict, cfg, device) -> dict:
    """Train a BLEEP/mclSTExp-style model with its own loss under gnnst's protocol: AdamW, the same
    warm-up + cosine schedule, epochs and patience, spatial-tile batches of ``train.batch_nodes``
    spots (no halo), and the epoch chosen by retrieval PCC on the validation spots of the training
    slides (bank = training part). Returns standardised test predictions."""
    import torch

    from gnnst.graph.sampler import SubgraphLoader
    from gnnst.train.trainer import _val_score, lr_factor, predict_graphs

    tc = cfg.train
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    loader = SubgraphLoader(fd["train_s"], batch_nodes=tc.batch_nodes, num_hops=0, shuffle=True, seed=cfg.seed)
    bank = SubgraphLoader(fd["train_s"], batch_nodes=tc.batch_nodes, num_hops=0)
    val_y = [g.y.numpy()[m] for g, m in zip(fd["val_s"], fd["val_masks"])]
    kw = dict(batch_nodes=tc.batch_nodes, num_hops=0, device=device, mode="retrieval")
    best, best_epoch, bad, best_state, history, nodes = -np.inf, -1, 0, None, [], 0
    t0 = time.perf_counter()
    for epoch in range(tc.epochs):
        if bad >= tc.patience:
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)
        loader.set_epoch(epoch)
        groups = loader.batches_of_parts()
        model.train()
        for i, group in enumerate(groups):
            b = loader.make_batch(group).to(device)
            for pg in opt.param_groups:
                pg["lr"] = tc.lr * lr_factor(epoch + i / max(len(groups), 1), tc.warmup_epochs, tc.epochs)
            loss = model.loss(model(b), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            nodes += int(b.center_mask.sum())
        model.eval()
        model.build_retrieval_bank(bank)
        preds = predict_graphs(model, fd["val_s"], **kw)
        score = _val_score(val_y, [p[m] for p, m in zip(preds, fd["val_masks"])])
        history.append(score)
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    model.eval()
    test = predict_graphs(model, fd["test_graphs"], **kw)
    return {"test": test, "best_epoch": best_epoch, "val_pcc": float(best), "epochs_run": len(history),
            "train_seconds": seconds, "nodes_per_second": nodes / max(seconds, 1e-9)}


def run_method(kind: str, cfg, fd: dict, workdir: Path, device) -> tuple[dict, dict]:
    """Predictions ``{slide: [N, G]}`` (normalised log expression) on the held-out slides, and details."""
    from gnnst.train.crossval import fit_ensemble, ridge_baseline

    fold, scaler = fd["fold"], fd["scaler"]
    if kind == "mean":
        mu = np.concatenate([g.y.numpy() for g in fd["train_full"]]).mean(0)
        return {s: np.tile(mu, (len(fd["y_test"][s]), 1)) for s in fold.test_slides}, {}
    if kind == "ridge":
        x_tr = np.concatenate([g.x.numpy() for g in fd["train_full"]])
        y_tr = np.concatenate([g.y.numpy() for g in fd["train_full"]])
        return ridge_baseline(x_tr, y_tr, {s: fd["graphs"][s].x.numpy() for s in fold.test_slides}, cfg.seed), {}
    if kind in ("bleep", "mclstexp"):
        from gnnst.models.bleep import BLEEP
        from gnnst.models.mclstexp import MclSTExp

        cls = {"bleep": BLEEP, "mclstexp": MclSTExp}[kind]
        import torch

        torch.manual_seed(cfg.seed)
        model = cls(int(fd["train_s"][0].x.shape[1]), len(fd["panel"].genes), dataclasses.replace(cfg.model, name=kind))
        r = fit_retrieval_model(model, fd, cfg, device)
        preds = {s: scaler.inverse(p) for s, p in zip(fold.test_slides, r.pop("test"))}
        return preds, r
    # gnnst, honest or leaky: exactly the ensemble code path of `gnnst train`
    ens = fit_ensemble(cfg, fd["panel"], fd["train_s"], fd["val_s"], fd["val_masks"], fd["test_graphs"], workdir,
                       resume=False, device=device, progress=False)
    preds = {s: scaler.inverse(p) for s, p in zip(fold.test_slides, ens["test"])}
    details = {"best_epochs": [f.best_epoch for f in ens["fits"]], "blend_alpha": ens["alpha"],
               "train_seconds": sum(f.seconds for f in ens["fits"]),
               "nodes_per_second": float(np.mean([f.nodes_per_second for f in ens["fits"]]))}
    return preds, details


# ---------------------------------------------------------------------------------------- metrics
def pooled_pcc(records: list[dict], subset: str) -> float:
    """Per gene, Pearson over the held-out spots of every fold whose own (training-slide) choice of
    ``subset`` contains the gene; then the mean over genes. Across slides, so slide-level offsets count."""
    from gnnst.eval.metrics import pearson_per_gene

    per_gene: dict[str, list] = defaultdict(list)
    for r in records:
        idx = {g: i for i, g in enumerate(r["genes"])}
        for g in r["subsets"][subset]:
            for s in r["y"]:
                per_gene[g].append((r["y"][s][:, idx[g]], r["p"][s][:, idx[g]]))
    vals = []
    for pairs in per_gene.values():
        y = np.concatenate([a for a, _ in pairs])[:, None]
        p = np.concatenate([b for _, b in pairs])[:, None]
        vals.append(pearson_per_gene(y, p)[0])
    vals = np.asarray(vals, dtype=float)
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def summarise_method(records: list[dict]) -> dict:
    """Per-slide means over held-out slides, cross-fold pooled PCC, MSE and MAE, time; and B4 alone."""
    per_slide = {s: v for r in records for s, v in r["metrics"]["per_slide"].items()}
    out = {}
    for sub in SUBSETS:
        vals = [v[f"pcc_{sub}"] for v in per_slide.values()]
        out[f"pcc_{sub}_per_slide"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        out[f"pcc_{sub}_pooled"] = pooled_pcc(records, sub)
    out["mse"] = float(np.mean([v["mse"] for v in per_slide.values()]))
    out["mae"] = float(np.mean([v["mae"] for v in per_slide.values()]))
    out["seconds"] = float(sum(r["seconds"] for r in records))
    out["per_slide"] = per_slide
    disjoint = [r for r in records if r["patient_disjoint"]]
    if disjoint:
        ps = {s: v for r in disjoint for s, v in r["metrics"]["per_slide"].items()}
        out["patient_disjoint"] = {**{f"pcc_{sub}_per_slide": float(np.nanmean([v[f"pcc_{sub}"] for v in ps.values()]))
                                      for sub in SUBSETS},
                                   "mse": float(np.mean([v["mse"] for v in ps.values()])),
                                   "mae": float(np.mean([v["mae"] for v in ps.values()])),
                                   "slides": sorted(ps)}
    return out


# ---------------------------------------------------------------------------------------- run
_WORKER: dict = {}  # per process: the config, the loaded slides and the methods' configs


def _init_worker(cache_dir: str | None, methods: list[str], overrides: list[str], threads: int | None) -> None:
    """Read and embed the slides once per process (warm cache): every method sees the same embeddings."""
    import logging as _logging

    from gnnst.config import load_config
    from gnnst.data.encoders import set_cpu_threads
    from gnnst.graph.dataset import load_and_embed

    _logging.getLogger("gnnst").setLevel(_logging.WARNING)
    base_over = list(overrides) + ([f"data.cache_dir={cache_dir}"] if cache_dir else [])
    base = load_config(REPO / "configs" / "her2st.yaml", base_over)
    t0 = time.perf_counter()
    loaded = load_and_embed(base, progress=False)
    _WORKER.update(base=base, loaded=loaded, load_seconds=time.perf_counter() - t0, base_over=base_over,
                   cfgs={m: load_config(REPO / "configs" / "her2st.yaml", base_over + METHODS[m][2]) for m in methods})
    set_cpu_threads(threads if threads is not None else base.train.num_threads)


def _run_task(m: str, fold_name: str) -> dict:
    """One method on one fold, in this process; returns its record (predictions included)."""
    import torch

    from gnnst.data.encoders import resolve_device
    from gnnst.eval.metrics import evaluate
    from gnnst.eval.splits import make_folds

    base, loaded, cfgs = _WORKER["base"], _WORKER["loaded"], _WORKER["cfgs"]
    fold = next(f for f in make_folds(loaded.patients(), mode=base.eval.folds) if f.name == fold_name)
    kind = METHODS[m][1]
    leaky = kind == "leaky"
    prepared = _WORKER.setdefault("prepared", {})
    if (fold_name, leaky) not in prepared:
        prepared[(fold_name, leaky)] = prepare_fold(loaded, base, fold, leaky=leaky)
    fd = prepared[(fold_name, leaky)]
    with tempfile.TemporaryDirectory(prefix="gnnst-acc-") as tmp:
        t0 = time.perf_counter()
        torch.manual_seed(cfgs[m].seed)
        preds, details = run_method(kind, cfgs[m], fd, Path(tmp), resolve_device(base.train.device))
        seconds = time.perf_counter() - t0
    with np.errstate(invalid="ignore", divide="ignore"):
        met = evaluate(fd["y_test"], preds, fd["panel"].genes, fd["subsets"])
    met.pop("per_gene")
    if kind == "mean":  # a constant: PCC on a slide is undefined (float rounding is not signal)
        for v in [met, *met["per_slide"].values()]:
            for k in [k for k in v if k.startswith(("pcc_", "spearman_"))]:
                v[k] = float("nan")
    print(f"  fold {fold.name:>3} {m:22s} PCC HEG50 "
          + ", ".join(f"{s} {v['pcc_heg50']:.3f}" for s, v in met["per_slide"].items())
          + f"  MSE {met['mse']:.4f}  {seconds:6.1f} s", flush=True)
    return {"method": m, "fold": fold.name, "patient_disjoint": fold.patient_disjoint, "seconds": seconds,
            "metrics": met, "details": details, "genes": list(fd["panel"].genes),
            "subsets": {k: list(v) for k, v in fd["subsets"].items()}, "y": fd["y_test"], "p": preds}


def run(cache_dir: str | None, methods: list[str], only_folds: list[str] | None, overrides: list[str],
        jobs: int = 1, workdir: Path | None = None, budget_min: float | None = None) -> dict:
    """Every method on every fold, as (method, fold) tasks in :data:`RUN_ORDER`, ``jobs`` at a time in
    worker processes of ``cores // jobs`` torch threads each (``jobs=1``: in this process, all cores).

    ``workdir``: each finished task is saved there and reused by a later run with the same folder
    (so a run cut short is completed, not redone). ``budget_min``: no task starts after this many
    minutes; rows missing a fold are then reported as unfinished.
    """
    import multiprocessing as mp
    import pickle
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from gnnst.eval.splits import make_folds

    cores = len(os.sched_getaffinity(0))
    threads = None if jobs == 1 else max(cores // jobs, 1)
    t_all = time.perf_counter()
    _init_worker(cache_dir, methods, overrides, threads)
    loaded, base = _WORKER["loaded"], _WORKER["base"]
    folds = make_folds(loaded.patients(), mode=base.eval.folds)
    if only_folds:
        folds = [f for f in folds if f.name in only_folds or set(f.test_slides) & set(only_folds)]
    done: dict[tuple[str, str], dict] = {}
    todo = []
    for m in [m for m in RUN_ORDER if m in methods]:
        for f in folds:
            path = workdir / m / f"{f.name}.pkl" if workdir else None
            if path is not None and path.is_file():
                done[(m, f.name)] = pickle.loads(path.read_bytes())
            else:
                todo.append((m, f.name))
    n_reused = len(done)
    if done:
        print(f"reusing {len(done)} finished (method, fold) results from {workdir}", flush=True)

    def over_budget() -> bool:
        return budget_min is not None and time.perf_counter() - t_all > 60 * budget_min

    def keep(rec: dict) -> None:
        done[(rec["method"], rec["fold"])] = rec
        if workdir is not None:
            path = workdir / rec["method"] / f"{rec['fold']}.pkl"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(rec))
            os.replace(tmp, path)

    if jobs == 1:
        for m, f in todo:
            if over_budget():
                break
            keep(_run_task(m, f))
    elif todo:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(cache_dir, methods, overrides, threads)) as pool:
            queue, pending = list(todo), set()
            while queue or pending:
                while queue and len(pending) < jobs and not over_budget():
                    pending.add(pool.submit(_run_task, *queue.pop(0)))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    keep(fut.result())
    complete = [m for m in methods if all((m, f.name) in done for f in folds)]
    unfinished = {m: sum((m, f.name) in done for f in folds) for m in methods if m not in complete}
    records = {m: [done[(m, f.name)] for f in folds] for m in complete}
    with np.errstate(invalid="ignore"):
        summary = {m: summarise_method(records[m]) for m in complete}
    for m in complete:  # keep the per-fold details, drop the arrays
        summary[m]["folds"] = [{k: r[k] for k in ("fold", "patient_disjoint", "seconds", "details")} for r in records[m]]
    return {"summary": summary, "folds": [f.to_dict() for f in folds], "load_seconds": _WORKER["load_seconds"],
            "seconds": time.perf_counter() - t_all, "jobs": jobs, "threads_per_job": threads or cores,
            "n_spots": int(sum(a.n_obs for a in loaded.adatas.values())), "methods": complete,
            "unfinished": unfinished, "reused": n_reused, "computed": len(done) - n_reused,
            "overrides": _WORKER["base_over"]}


def _f(v: float, nd: int = 3) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def format_tables(r: dict) -> str:
    S, methods = r["summary"], r["methods"]
    head = ("| method | PCC HEG50 per slide | PCC HVG50 per slide | PCC all per slide | PCC HEG50 pooled "
            "| PCC HVG50 pooled | PCC all pooled | MSE | MAE | time (s) |")
    lines = ["**All six held-out slides** (leave-one-slide-out; per slide = mean over the six held-out slides of "
             "the per-gene PCC on that slide; pooled = per-gene PCC over the held-out spots of all six folds):", "",
             head, "|---" * 10 + "|"]
    for m in methods:
        s = S[m]
        per = [s[f"pcc_{k}_per_slide"] for k in SUBSETS]
        lines.append(f"| {METHODS[m][0]} | " + " | ".join(_f(v) for v in per) + " | "
                     + " | ".join(_f(s[f"pcc_{k}_pooled"]) for k in SUBSETS)
                     + f" | {_f(s['mse'], 4)} | {_f(s['mae'], 4)} | {s['seconds']:.0f} |")
    lines += ["", "**Patient-disjoint fold only** (B4, patient B; trained on patient C's five slides):", "",
              "| method | PCC HEG50 | PCC HVG50 | PCC all | MSE | MAE |", "|---" * 6 + "|"]
    for m in methods:
        d = S[m].get("patient_disjoint")
        if d:
            lines.append(f"| {METHODS[m][0]} | " + " | ".join(_f(d[f"pcc_{k}_per_slide"]) for k in SUBSETS)
                         + f" | {_f(d['mse'], 4)} | {_f(d['mae'], 4)} |")
    slides = sorted({s for m in methods for s in S[m]["per_slide"]})
    lines += ["", "**PCC HEG50 by held-out slide:**", "", "| method | " + " | ".join(slides) + " |",
              "|---" * (len(slides) + 1) + "|"]
    for m in methods:
        lines.append(f"| {METHODS[m][0]} | " + " | ".join(_f(S[m]["per_slide"].get(s, {}).get("pcc_heg50", np.nan))
                                                          for s in slides) + " |")
    return "\n".join(lines)


def notes(r: dict) -> str:
    S = r["summary"]
    out = [
        f"- {r['n_spots']} spots, {len(r['folds'])} folds; embeddings (efficientnet_lite0, 150 µm patches) loaded "
        f"once from the warm cache in {r['load_seconds']:.1f} s and shared by every method; per fold every row "
        "uses the same gene panel (chosen on the five training slides), the same normalisation (normalize_total "
        "+ log1p) and, where a model is trained, the same validation blocks, standardisation, epochs (60), "
        "patience (15), learning rate and seed (0).",
        "- `time` = wall seconds summed over the six folds for fitting and predicting (ensembles: all members; "
        "includes the per-epoch validation pass)"
        + (f"; tasks ran {r['jobs']} at a time with {r['threads_per_job']} torch thread(s) each." if r["computed"]
           else "."),
        "- Mean predictor: a constant per fold, so its per-slide PCC is undefined (—). Its pooled PCC is not: "
        "pooled across folds, the fold-wise training means still differ, so pooled figures reward slide-level "
        "offsets; per-slide figures are the primary ones.",
    ]
    if {"bleep", "mclstexp"} & set(S):
        out.append("- BLEEP-style and mclSTExp-style rows: `gnnst/models/bleep.py`, `gnnst/models/mclstexp.py`, written "
                   "from the papers' descriptions; one model each (no ensemble), on the same frozen patch embeddings "
                   "as gnnst (the papers fine-tune a CNN image encoder), trained with their own losses under gnnst's "
                   "protocol (tile batches of 512 spots, same epochs, patience and validation blocks), predicting by "
                   "retrieval only.")
    if any(m.startswith("gnnst") for m in S):
        out.append("- Rows marked ens 1 train one model (seed 0) per fold instead of the default ensemble of 3, to keep "
                   "the run short; compare ablations with \"gnnst, full (ens 1)\"."
                   + (" The ens 3 row is exactly what `gnnst train --config configs/her2st.yaml` runs." if "gnnst" in S
                      else ""))
    pairs = [(lk, h) for lk, h in (("gnnst_leaky_e1", "gnnst_full_e1"), ("gnnst_leaky", "gnnst")) if lk in S and h in S]
    if pairs:
        out.append(
            "- LEAKY rows (not valid results, shown for comparison with published numbers): gene panel and "
            "top-50 lists chosen on all six slides including the held-out one, and the held-out slide used as "
            "the validation set, so early stopping, checkpoint and head/retrieval blend are picked on it. "
            + "; ".join(f"{METHODS[lk][0]}: PCC HEG50 per slide {_f(S[lk]['pcc_heg50_per_slide'])} vs "
                        f"{_f(S[h]['pcc_heg50_per_slide'])} honest "
                        f"({S[lk]['pcc_heg50_per_slide'] - S[h]['pcc_heg50_per_slide']:+.3f})" for lk, h in pairs) + ".")
    if r["unfinished"]:
        out.append("- Not finished within the run's time budget (rows left out; folds done of "
                   f"{len(r['folds'])}): " + ", ".join(f"{METHODS[m][0]} ({k})" for m, k in r["unfinished"].items())
                   + ". `--resume` completes them.")
    if r["reused"]:
        out.append(f"- {r['reused']} of the (method, fold) results were computed by earlier invocations of this "
                   "script and reused (`--resume`); the computation code did not change between them.")
    out.append(f"- This invocation: {r['seconds'] / 60:.1f} min on this machine.")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=None, help="embedding cache (data.cache_dir); a warm one saves encoding")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--folds", nargs="+", default=None, help="only these folds (test slide ids); default all")
    p.add_argument("--jobs", type=int, default=1, help="tasks run at once, in worker processes sharing the cores")
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench_accuracy"),
                   help="finished (method, fold) results are kept here")
    p.add_argument("--resume", action="store_true", help="reuse the results in --workdir (else it is emptied first)")
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
    partial = args.folds or args.overrides or args.methods != list(METHODS)
    if not args.no_write and not partial:
        write_section("accuracy", "Accuracy on her2st-6 (`benchmarks/accuracy.py`)", text)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "accuracy.json").write_text(json.dumps(r, indent=2, default=float) + "\n")
    elif not args.no_write:
        print("(partial run: RESULTS.md not updated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
