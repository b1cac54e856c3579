"""Cross-validation, the evaluation protocol: per fold, everything is chosen on the training slides only.

Per fold (:func:`gnnst.train.prepare.prepare_training`): gene panel and reported subsets from the
training slides; target standardisation from the training spots; a validation split carved from the
training slides for early stopping, checkpoint and blend choice. The fold's ensemble becomes a
:class:`~gnnst.predictor.TrainedModel` (written as ``folds/<fold>/model.pt``) and the held-out slides
are scored THROUGH it (:meth:`TrainedModel.predict`: the image side alone, the same code as ``gnnst
predict``), then compared with their measured expression (:mod:`gnnst.metrics`). The baselines of
``eval.baselines`` (:mod:`gnnst.eval.baselines`) run on the same folds, panels and embeddings.
``eval.select_on_heldout`` switches to the LEAKY protocol of the literature (for comparison only; see
:mod:`gnnst.train.prepare`), and every output of such a run says LEAKY.

The input is one :class:`~gnnst.graph.store.SlideSource`: the graph folder of ``data.graphs`` (``gnnst
train --graphs``), else the one built from the manifest's slides into the cache first (or reused from
there, :func:`gnnst.graph.dataset.ensure_dataset`), or slides read and embedded in memory
(:class:`~gnnst.graph.dataset.LoadedSlides`, shared by the settings of ``gnnst ablate`` and the accuracy
benchmark). Every fold computes the same panel, targets and scaling from any of them.

Writes into ``out``: ``config.yaml``, ``train.log``; per fold ``folds/<fold>/member<i>/{last,best}.pt``,
``model.pt``, ``result.json`` and ``heldout.npz`` (the held-out measurements and every method's
predictions, for the summary across folds and ``--resume``); ``predictions/<slide>.h5ad`` per held-out
slide (:mod:`gnnst.predictions`); ``final/model.pt`` (``eval.final_model``); ``metrics.json``; ``figures/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import __version__
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from gnnst.config import Config
    from gnnst.eval.splits import Fold
    from gnnst.metrics import FoldPredictions, MetricSet
    from gnnst.train.prepare import TrainingSet

log = logging.getLogger("gnnst")

MODEL = "model"  # the method name of the trained model among the baselines in heldout.npz
HELDOUT = "heldout.npz"  # per fold: y_<i> and p_<method>_<i> for the i-th test slide


def run_crossval(cfg: "Config", out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, loaded=None, fit_model: bool = True) -> dict:
    """Cross-validate ``cfg`` on its manifest's slides; returns (and writes) ``metrics.json``.

    Args:
        cfg: the resolved config.
        out: output folder (see the module docstring).
        resume: reuse finished folds (``result.json`` + ``heldout.npz``) and member checkpoints; refused
            when ``out`` was run with a config that differs in a key that changes results
            (:class:`gnnst.outputs.RunFolder`, :data:`gnnst.config.RESULT_NEUTRAL`).
        overwrite: replace the run already in ``out`` (without it, or ``resume``, one is refused), so no
            fold of an earlier run reaches this run's ``metrics.json``, predictions or exports.
        loaded: the slides as a :class:`~gnnst.graph.store.SlideSource` made with the same
            ``data``/``patch``/``encoder`` config (e.g. read and embedded once by
            :func:`gnnst.graph.dataset.load_and_embed` for the settings of ``gnnst ablate``); default: the
            graph folder of ``data.graphs``, else :func:`gnnst.graph.dataset.ensure_dataset`.
        fit_model: ``False`` fits and scores only the baselines (no model, predictions or final model).
    """
    from gnnst.config import config_to_dict
    from gnnst.data.encoders import resolve_device, set_cpu_threads
    from gnnst.data.manifest import load_manifest
    from gnnst.eval.splits import make_folds
    from gnnst.graph.dataset import ensure_dataset, resolve_patch_size
    from gnnst.graph.store import GraphDataset
    from gnnst.io import atomic_write_json
    from gnnst.metrics import MetricSet, summarise
    from gnnst.models import list_models
    from gnnst.outputs import TRAIN_RUN, RunFolder
    from gnnst.train.distributed import barrier, current
    from gnnst.train.prepare import LEAKY
    from gnnst.train.trainer import resolve_batch_nodes

    t_all = time.perf_counter()
    out = Path(out)
    if fit_model and cfg.model.name not in list_models():
        raise GnnstError(f"config key 'model.name': unknown model {cfg.model.name!r} (known: {', '.join(list_models())})")
    main = current().is_main  # only the main process writes outputs
    source = loaded
    restain = cfg.features.stain_norm != "none" or cfg.features.stain_augment > 0  # re-embeds the patches
    if source is None and cfg.data.graphs:  # stain normalisation / augmentation read the recorded images
        source = GraphDataset(cfg.data.graphs)
        source.check_config(cfg)
        if restain:
            for s in source.slide_ids:
                source.image_slide(s)  # each image still there (one line naming the first that is not): before any work
    resolve_patch_size(cfg)  # the number itself is compared and recorded
    device = resolve_device(cfg.train.device)
    resolve_batch_nodes(cfg, device)  # likewise
    folder = RunFolder(out, TRAIN_RUN, cfg, resume=resume, overwrite=overwrite)  # checks only: before any work
    resume = folder.resume
    progress = progress and main
    patients = source.patients() if source is not None else \
        {e.slide_id: e.patient_id or e.slide_id for e in load_manifest(cfg.data.manifest).select(cfg.data.slides)}
    folds = select_folds(make_folds(patients, mode=cfg.eval.folds), cfg.eval.only_folds)
    if cfg.eval.select_on_heldout:
        log.warning("%s: for comparison with published numbers only, not a valid estimate", LEAKY)
    if source is None:
        source = ensure_dataset(cfg, progress=progress)
    if isinstance(source, GraphDataset):
        log.info("slides: the graphs in %s", source.root)
    barrier()  # every rank has checked the folder before rank 0 writes into it
    folder.begin(write=main)  # the inputs are read and checked: the old run goes (overwrite), config.yaml, log
    set_cpu_threads(cfg.train.num_threads)
    ms = MetricSet.from_config(cfg.eval)
    methods = ([MODEL] if fit_model else []) + list(cfg.eval.baselines)
    records: dict[str, list] = {m: [] for m in methods}
    fold_results = []
    kw = dict(ms=ms, methods=methods, resume=resume, device=device, progress=progress, run_config=config_to_dict(cfg),
              out=out)
    if fit_model and cfg.train.distributed == "folds" and current().world_size > 1:
        done = _spread_folds(cfg, source, folds, **kw)  # folds and members spread over torchrun's ranks
    else:
        done = {}
        for fi, fold in enumerate(folds):
            fdir = out / "folds" / fold.name
            done[fold.name] = _load_fold(fdir, fold, methods) if resume else None
            if done[fold.name] is not None:
                log.info("fold %s: already done, reusing %s", fold.name, fdir / "result.json")
            else:
                log.info("fold %d/%d %s: train %s, test %s%s", fi + 1, len(folds), fold.name, fold.train_slides,
                         fold.test_slides, " (patient-disjoint)" if fold.patient_disjoint else "")
                done[fold.name] = run_fold(cfg, source, fold, fdir, main=main, **kw)
    for fold in folds:
        result, preds = done[fold.name]
        fold_results.append(result)
        for m in methods:
            records[m].append(preds[m])
    metrics = {"gnnst_version": __version__, "protocol": LEAKY if cfg.eval.select_on_heldout else "honest",
               "model": cfg.model.name if fit_model else None, "definitions": ms.describe()}
    if fit_model:
        disjoint = [r for r in records[MODEL] if r.patient_disjoint]
        metrics["summary"] = summarise(records[MODEL])
        metrics["summary_patient_disjoint"] = summarise(disjoint)
    metrics["baselines"] = {b: summarise(records[b]) for b in cfg.eval.baselines}
    metrics["baselines_patient_disjoint"] = {b: summarise([r for r in records[b] if r.patient_disjoint])
                                             for b in cfg.eval.baselines}
    metrics["folds"] = fold_results
    metrics["train_seconds_per_fold"] = (float(np.mean([r["train_seconds"] for r in fold_results]))
                                         if fit_model and fold_results else 0.0)
    if fit_model:
        metrics["reliability"] = reliability_summary(fold_results, cfg.reliability.interval_level)
    if fit_model and cfg.eval.final_model:
        final = fit_final(cfg, source, out / "final", fold_results=fold_results, resume=resume, device=device,
                          progress=progress, main=main)
        if main:
            from gnnst.predictor import TrainedModel

            genes = TrainedModel.load(final).gene_reliability().summary()
            metrics["reliability"]["final_model_genes"] = {k: v for k, v in genes.items() if k != "definition"}
    metrics["config"] = config_to_dict(cfg)
    metrics["seconds_total"] = time.perf_counter() - t_all
    metrics["embedding_timings"] = dict(source.timer.totals)
    if main:
        atomic_write_json(out / "metrics.json", metrics)
    if main and fit_model and cfg.eval.figures:
        _write_figures(out)
    return metrics


def select_folds(folds: list["Fold"], only: list[str] | None) -> list["Fold"]:
    """``folds`` restricted to ``eval.only_folds`` (fold names or test slide ids); an unknown one raises."""
    if not only:
        return folds
    names = {f.name for f in folds} | {s for f in folds for s in f.test_slides}
    bad = [n for n in only if n not in names]
    if bad:
        raise GnnstError(f"config key 'eval.only_folds': unknown fold '{bad[0]}' (folds: {sorted(names)})")
    return [f for f in folds if f.name in only or set(f.test_slides) & set(only)]


def _spread_folds(cfg: "Config", source, folds: list["Fold"], *, ms: "MetricSet", methods: list[str], resume: bool,
                  device, progress: bool, run_config: dict, out: Path) -> dict:
    """Cross-validation under torchrun with ``train.distributed: folds``: the (fold, member) units of the
    folds still to run are cut into one contiguous block per rank (:func:`gnnst.train.distributed.spread_units`);
    each rank prepares only the folds of its block and writes each member it trains to the fold's folder
    (:func:`gnnst.train.ensemble.save_member`); the rank holding a fold's member 0 assembles it from those
    files and scores and writes it (:func:`run_fold`): at once when it trained all of them, else after a
    barrier (so a rank keeps at most one fold's training set: the last of its block, when that fold goes
    on in the next rank's block); after another, every rank reads every fold back (:func:`_load_fold`,
    as ``--resume`` does). Returns ``{fold name: (result, {method: FoldPredictions})}``, the same as one
    process."""
    from gnnst.train.distributed import barrier, current, spread_units
    from gnnst.train.ensemble import fit_member, member_file, save_member
    from gnnst.train.prepare import prepare_training

    info = current()
    done = {f.name: _load_fold(out / "folds" / f.name, f, methods) if resume else None for f in folds}
    todo = [f for f in folds if done[f.name] is None]
    blocks = spread_units(len(todo), cfg.train.ensemble, info.world_size)
    owner = {f: r for r, block in enumerate(blocks) for f, i in block if i == 0}
    mine = blocks[info.rank]
    log.info("rank %d of %d: folds %s (members %s)", info.rank, info.world_size,
             sorted({todo[f].name for f, _ in mine}), [(todo[f].name, i) for f, i in mine])

    def score(fi: int, ts: "TrainingSet") -> None:  # the owner: assemble fold fi from its members' files
        run_fold(cfg, source, todo[fi], out / "folds" / todo[fi].name, ms=ms, methods=methods, resume=resume,
                 device=device, progress=progress, main=True, run_config=run_config, out=out, ts=ts, from_files=True)

    kept = {}
    for fi in dict.fromkeys(f for f, _ in mine):  # the folds this rank prepares, in order
        fold, fdir = todo[fi], out / "folds" / todo[fi].name
        train = [i for f, i in mine if f == fi and not (resume and member_file(fdir, i).is_file())]
        if not train and owner[fi] != info.rank:
            continue  # its members here are trained already (--resume) and another rank scores it
        log.info("fold %s: train %s, test %s%s (rank %d)", fold.name, fold.train_slides, fold.test_slides,
                 " (patient-disjoint)" if fold.patient_disjoint else "", info.rank)
        ts = prepare_training(cfg, source, fold.train_slides, fold.test_slides,
                              select_on_heldout=cfg.eval.select_on_heldout)
        for i in train:
            save_member(member_file(fdir, i),
                        fit_member(cfg, ts, fdir, i, resume=resume, device=device, progress=progress))
        if owner[fi] == info.rank:
            if all((fi, i) in mine for i in range(cfg.train.ensemble)):  # all its members are here: score it now
                score(fi, ts)
            else:  # kept until the next rank(s) wrote its other members: at most one, its block's last fold
                kept[fi] = ts
    barrier()  # every member of every fold is on disk
    for fi, ts in kept.items():
        score(fi, ts)
    kept.clear()
    barrier()  # every fold is scored and written
    for fold in todo:
        done[fold.name] = _load_fold(out / "folds" / fold.name, fold, methods)
        if done[fold.name] is None:
            raise GnnstError(f"{out / 'folds' / fold.name}: fold {fold.name} was scored by rank "
                             f"{owner[todo.index(fold)]} but its files are not here: under torchrun the output folder "
                             f"must be on a filesystem every rank sees")
    return done


def run_fold(cfg: "Config", source, fold: "Fold", fdir: Path, *, ms: "MetricSet", methods: list[str], resume: bool,
             device, progress: bool, main: bool, run_config: dict, out: Path, ts: "TrainingSet | None" = None,
             from_files: bool = False) -> tuple[dict, dict]:
    """One fold: train, score the held-out slides through the fold's TrainedModel, fit the baselines,
    write the fold's files; returns ``(result, {method: FoldPredictions})``. ``ts``: the fold's training
    set when prepared already; ``from_files``: its members were trained already and are read from its
    folder (:func:`_spread_folds`)."""
    from gnnst.eval.baselines import baseline_validation_score, fit_baseline
    from gnnst.io import atomic_write_json
    from gnnst.metrics import FoldPredictions, report_subsets, summarise
    from gnnst.predictor import EncoderInfo
    from gnnst.train.ensemble import fit_ensemble
    from gnnst.train.prepare import prepare_training

    t_fold = time.perf_counter()
    fdir.mkdir(parents=True, exist_ok=True)
    if ts is None:
        ts = prepare_training(cfg, source, fold.train_slides, fold.test_slides,
                              select_on_heldout=cfg.eval.select_on_heldout)
    subsets = report_subsets(ts.panel.genes, ts.panel.heg, ts.panel.hvg, _selection_expression(cfg, ts), ms)
    y_test = {s: ts.graphs[s].y.numpy().astype(np.float32) for s in fold.test_slides}
    preds: dict[str, dict] = {}
    result = {**fold.to_dict(), "protocol": ts.protocol, "genes": subsets, "features": ts.feature_norm.describe()}
    if MODEL in methods:
        ens = fit_ensemble(cfg, ts, fdir, fold=fold.to_dict(), encoder=EncoderInfo.from_dict(source.encoder),
                           resume=resume, device=device, progress=progress, from_files=from_files)
        if main:
            ens.model.save(fdir / "model.pt")
        got = dict(zip(fold.test_slides, ens.model.predict([ts.graphs[s] for s in fold.test_slides], device=device)))
        preds[MODEL] = {s: p.expression for s, p in got.items()}
        result.update({"best_epochs": [f.best_epoch for f in ens.fits],
                       "val_pcc_members": [f.best_score for f in ens.fits], "val_pcc_ensemble": ens.val_score,
                       "blend_alpha": ens.model.blend_alpha, "train_seconds": sum(f.seconds for f in ens.fits),
                       # wall time of training the members (side by side: less than the sum of theirs)
                       "train_wall_seconds": ens.train_wall_seconds,
                       "nodes_per_second": float(np.mean([f.nodes_per_second for f in ens.fits])),
                       "epochs_run": [len(f.history) for f in ens.fits]})
        result.update(_fold_reliability(ens.model, got, y_test))
    seconds, val_scores = {}, {}
    for b in methods:
        if b != MODEL:
            t0 = time.perf_counter()
            preds[b] = fit_baseline(b, ts, fold.test_slides, cfg.seed, cfg.eval.baseline_spots)
            seconds[b] = time.perf_counter() - t0
            # inner validation, training slides only
            val_scores[b] = baseline_validation_score(b, ts, cfg.seed, cfg.eval.baseline_spots)
    fps = {m: FoldPredictions(fold.name, list(ts.panel.genes), subsets, y_test, preds[m], fold.patient_disjoint)
           for m in methods}
    if MODEL in methods:
        result.update(_fold_block(fps[MODEL], per_gene=True))
    result["baselines"] = {b: {**_fold_block(fps[b], per_gene=False), "seconds": seconds[b], "val_pcc": val_scores[b]}
                           for b in seconds}
    result["fold_seconds"] = time.perf_counter() - t_fold
    if main:
        _save_heldout(fdir / HELDOUT, fold, y_test, preds)
        if MODEL in methods:
            _write_predictions(out, source, ts, fold, ens.model, got, y_test, result, run_config)
        atomic_write_json(fdir / "result.json", result)
    head = summarise([fps[MODEL]]) if MODEL in methods else {}
    log.info("fold %s: PCC %s per slide %.3f%s, all %.3f, blend alpha %s, %.1f s", fold.name,
             ms.subset_label("heg"), head.get("pcc_heg_per_slide", float("nan")),
             "".join(f" ({b} {result['baselines'][b]['pcc_heg_per_slide']:.3f})" for b in result["baselines"]),
             head.get("pcc_all_per_slide", float("nan")), result.get("blend_alpha"), result["fold_seconds"])
    return result, fps


def _selection_expression(cfg: "Config", ts: "TrainingSet") -> np.ndarray | None:
    """The normalised expression the reported HVG are chosen on (``eval.hvg: variance``): the training
    slides, or every slide of the fold under the LEAKY protocol."""
    if cfg.eval.hvg != "variance":
        return None
    slides = ts.train_slides + (ts.test_slides if cfg.eval.select_on_heldout else [])
    return np.concatenate([ts.graphs[s].y.numpy().astype(np.float32) for s in slides])


def _fold_reliability(model, got: dict, y: dict) -> dict:
    """The fold model's spread scale and OOD reference, and per held-out slide the reliability figures
    (:func:`gnnst.metrics.reliability_scores`): its measured expression ``y`` is used for this scoring only."""
    from gnnst.metrics import reliability_scores

    cal, ref = model.calibration, model.ood_reference
    return {"calibration": None if cal is None else cal.to_dict(),
            "ood_reference": None if ref is None else {k: v for k, v in ref.summary().items() if k != "definition"},
            "reliability": {s: reliability_scores(y[s], p.expression, p.sd, p.ood, scale=None if cal is None else cal.scale,
                                                  z=None if cal is None else cal.z) for s, p in got.items()}}


def reliability_summary(fold_results: list[dict], level: float) -> dict:
    """``metrics.json['reliability']``: definitions, the figures over all held-out slides and over the
    patient-disjoint folds' (:func:`gnnst.metrics.summarise_reliability`), and each held-out slide's."""
    from gnnst.metrics import RELIABILITY_COLUMNS, describe_reliability, summarise_reliability

    every = [(f, v) for f in fold_results for v in f.get("reliability", {}).values()]
    return {"definitions": describe_reliability(level),
            "summary": summarise_reliability([v for _, v in every]),
            "summary_patient_disjoint": summarise_reliability([v for f, v in every if f["patient_disjoint"]]),
            "per_slide": {s: {k: v.get(k) for k in RELIABILITY_COLUMNS}
                          for f in fold_results for s, v in f.get("reliability", {}).items()},
            "spread_scale": {f["name"]: (f.get("calibration") or {}).get("scale") for f in fold_results}}


def _fold_block(fp: "FoldPredictions", *, per_gene: bool) -> dict:
    """A fold's figures (:func:`gnnst.metrics.summarise` over this fold) and its per-slide scores."""
    from gnnst.metrics import summarise

    block = summarise([fp])
    block["per_slide"] = {s: (v if per_gene else {k: x for k, x in v.items() if k != "pcc_per_gene"})
                          for s, v in fp.slide_scores().items()}
    return block


def _save_heldout(path: Path, fold: "Fold", y: dict, preds: dict) -> None:
    from gnnst.io import atomic_path

    arrays = {f"y_{i}": y[s] for i, s in enumerate(fold.test_slides)}
    for m, p in preds.items():
        arrays.update({f"p_{m}_{i}": p[s] for i, s in enumerate(fold.test_slides)})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _load_fold(fdir: Path, fold: "Fold", methods: list[str]) -> tuple[dict, dict] | None:
    """A finished fold's ``(result, {method: FoldPredictions})``, or ``None`` when it is not (completely)
    there or lacks a method of this run."""
    from gnnst.metrics import FoldPredictions

    res, npz = fdir / "result.json", fdir / HELDOUT
    if not (res.is_file() and npz.is_file()):
        return None
    result = json.loads(res.read_text())
    with np.load(npz) as z:
        if any(f"p_{m}_0" not in z for m in methods):
            return None
        y = {s: z[f"y_{i}"] for i, s in enumerate(fold.test_slides)}
        fps = {m: FoldPredictions(fold.name, list(result["genes"]["all"]), result["genes"], y,
                                  {s: z[f"p_{m}_{i}"] for i, s in enumerate(fold.test_slides)}, fold.patient_disjoint)
               for m in methods}
    return result, fps


def _write_predictions(out: Path, source, ts: "TrainingSet", fold: "Fold", model, preds: dict, y: dict,
                       result: dict, run_config: dict) -> None:
    """``predictions/<slide>.h5ad`` of each held-out slide (measured in ``X``, prediction in the layer,
    sd and OOD flags from ``preds``: slide -> :class:`~gnnst.predictor.Prediction`)."""
    from gnnst.io import atomic_write_h5ad
    from gnnst.predictions import prediction_anndata

    for s in fold.test_slides:
        g, spots = ts.graphs[s], source.spots(s)
        scores = {k: v for k, v in result["per_slide"][s].items() if k != "pcc_per_gene"}
        out_a = prediction_anndata(model, preds[s], slide_id=s, barcodes=spots.barcodes, pixel=spots.pixel,
                                   mpp=spots.mpp, graph=g, embeddings=g.x.numpy(), measured=y[s],
                                   image_path=spots.image_path, image_scalef=spots.image_scalef,
                                   config=run_config, metrics=scores)
        atomic_write_h5ad(out_a, out / "predictions" / f"{s}.h5ad")


def cv_per_gene(fold_results: list[dict], genes: list[str]) -> dict:
    """Per-gene cross-validated PCC of a run for ``genes`` (the final model's panel, in its order), its
    :attr:`TrainedModel.cv`: over every held-out slide whose fold panel holds the gene, the mean and sd
    (``ddof=1``) of the gene's Pearson r on that slide, the number of slides, and the mean over the
    patient-disjoint folds' slides; ``None`` where no fold's panel holds the gene (count 0)."""
    per_gene: dict[str, list[float]] = {}
    disjoint: dict[str, list[float]] = {}
    for f in fold_results:
        for v in f.get("per_slide", {}).values():
            for g, r in zip(f["genes"]["all"], v.get("pcc_per_gene", [])):
                if r is None:
                    continue
                per_gene.setdefault(g, []).append(r)
                if f["patient_disjoint"]:
                    disjoint.setdefault(g, []).append(r)
    genes = list(genes)
    return {"genes": genes,
            "pcc_mean": [float(np.mean(per_gene[g])) if g in per_gene else None for g in genes],
            "pcc_sd": [float(np.std(per_gene[g], ddof=1)) if len(per_gene.get(g, [])) > 1 else None for g in genes],
            "n_slides": [len(per_gene.get(g, [])) for g in genes],
            "pcc_patient_disjoint": [float(np.mean(disjoint[g])) if g in disjoint else None for g in genes],
            "definition": "Pearson r of the gene on each held-out slide of the run's folds (folds whose panel "
                          "holds it): mean, sd (ddof=1) and count over those slides; patient_disjoint: mean over "
                          "the slides of patient-disjoint folds"}


def fit_final(cfg: "Config", source, fdir: Path, *, fold_results: list[dict], resume: bool, device,
              progress: bool, main: bool = True) -> Path:
    """Train on every slide of ``source`` exactly as a fold trains on its training slides and write
    ``fdir/model.pt`` (``fold.name == "final"``, no test slides, :attr:`TrainedModel.cv` from the finished
    folds' ``fold_results``, :func:`cv_per_gene`). With ``resume`` a finished one is kept."""
    from gnnst.predictor import EncoderInfo
    from gnnst.train.ensemble import fit_ensemble
    from gnnst.train.prepare import prepare_training

    path = fdir / "model.pt"
    if resume and path.is_file():
        log.info("final model: already trained, reusing %s", path)
        return path
    slides = list(source.slide_ids)
    log.info("final model: training on all %d slides (%s)", len(slides), ", ".join(slides))
    t0 = time.perf_counter()
    fdir.mkdir(parents=True, exist_ok=True)
    ts = prepare_training(cfg, source, slides, [])
    fold = {"name": "final", "train_slides": slides, "test_slides": [], "patient_disjoint": False}
    ens = fit_ensemble(cfg, ts, fdir, fold=fold, encoder=EncoderInfo.from_dict(source.encoder), resume=resume,
                       device=device, progress=progress)
    ens.model.cv = cv_per_gene(fold_results, ens.model.panel.genes)
    if main:
        ens.model.save(path)
    log.info("final model: %s (validation PCC %.3f, blend alpha %s, %.1f s)", path, ens.val_score,
             ens.model.blend_alpha, time.perf_counter() - t0)
    return path


def _write_figures(out: Path) -> None:
    """The run's figures; a failure is logged, not raised (metrics and predictions are already written)."""
    from gnnst.eval.figures import plot_run

    try:
        paths = plot_run(out)
    except Exception as e:  # figures must not turn a finished training run into a failure
        log.warning("figures not written (%s: %s); retry with `gnnst plot --run %s`", type(e).__name__, e, out)
        return
    log.info("figures: %s", ", ".join(p.name for p in paths))
