"""Honest cross-validation: per fold, everything is chosen on the training slides only.

Per fold: gene panel (and so the top-50 HEG/HVG reported) from the training slides; target
standardisation statistics from the training spots; a validation split carved from the training
slides for early stopping and checkpoint choice; the held-out slides are predicted from their image
side alone and only then compared with their measured expression. A ridge baseline (PCA to 256 +
ridge, HEST-Benchmark style, ridge strength by generalised cross-validation on the training spots)
runs on the same folds, panels and embeddings.

Writes into ``out``: ``config.yaml``, ``train.log``, ``folds/<fold>/{last,best}.pt`` and
``model.pt`` (the checkpoint used for prediction), ``predictions/<slide>.h5ad`` per held-out slide
and ``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import __version__, keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from gnnst.config import Config

log = logging.getLogger("gnnst")

SUMMARY_KEYS = ("pcc_heg50_per_slide", "pcc_hvg50_per_slide", "pcc_all_per_slide", "pcc_heg50_pooled",
                "pcc_hvg50_pooled", "pcc_all_pooled", "spearman_heg50_per_slide", "mse", "mae")


class TargetScaler:
    """Per-gene standardisation with statistics of the training spots only."""

    def __init__(self, y_train: np.ndarray):
        # accumulate in float64: y may be stored in float16 (large slides), whose sums lose digits
        self.mean = y_train.mean(0, dtype=np.float64).astype(np.float32)  # [G]
        self.std = np.maximum(y_train.std(0, dtype=np.float64), 1e-3).astype(np.float32)  # [G]

    def transform(self, y):
        return (y - self.mean) / self.std

    def inverse(self, z):
        return z * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetScaler":
        obj = cls.__new__(cls)
        obj.mean = np.asarray(d["mean"], dtype=np.float32)
        obj.std = np.asarray(d["std"], dtype=np.float32)
        return obj


def ridge_baseline(x_train: np.ndarray, y_train: np.ndarray, x_test: dict[str, np.ndarray], seed: int) -> dict:
    """PCA to 256 then ridge (strength by GCV on the training spots); predictions per test slide."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_train)
    pca = PCA(n_components=min(256, x_train.shape[0] - 1, x_train.shape[1]), random_state=seed)
    z = pca.fit_transform(sc.transform(x_train))
    ridge = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(z, y_train)
    return {s: ridge.predict(pca.transform(sc.transform(x))).astype(np.float32) for s, x in x_test.items()}


def _to_tensor_graph(g, scaler: TargetScaler):
    import torch

    d = copy.copy(g)  # shares x, pos and the edges with g: only y is new (a clone doubled a large slide)
    d.y = torch.from_numpy(scaler.transform(g.y.numpy()).astype(g.y.numpy().dtype))  # storage dtype kept
    return d


def run_crossval(cfg: "Config", out: str | Path, *, resume: bool = False, progress: bool = True,
                 loaded=None) -> dict:
    """Cross-validate ``cfg`` on its manifest's slides; returns (and writes) ``metrics.json``.

    ``loaded``: slides already read and embedded by :func:`gnnst.graph.dataset.load_and_embed` with
    the same ``data``/``patch``/``encoder`` config (reused across the settings of ``gnnst ablate``).
    With ``cfg.eval.figures`` the figures of :mod:`gnnst.eval.figures` are written into ``out/figures``.
    """
    from gnnst.config import config_to_dict, dump_config
    from gnnst.data.encoders import resolve_device, set_cpu_threads
    from gnnst.data.manifest import load_manifest
    from gnnst.eval.metrics import evaluate
    from gnnst.eval.splits import make_folds
    from gnnst.graph.dataset import load_and_embed
    from gnnst.io import atomic_torch_save, atomic_write_json

    from gnnst.train.distributed import current

    t_all = time.perf_counter()
    out = Path(out)
    main = current().is_main  # only the main process writes outputs
    progress = progress and main
    entries = load_manifest(cfg.data.manifest).select(cfg.data.slides)
    folds = make_folds({e.slide_id: e.patient_id or e.slide_id for e in entries}, mode=cfg.eval.folds)
    if cfg.eval.only_folds:
        names = {f.name for f in folds} | {s for f in folds for s in f.test_slides}
        bad = [n for n in cfg.eval.only_folds if n not in names]
        if bad:
            raise GnnstError(f"config key 'eval.only_folds': unknown fold '{bad[0]}' (folds: {sorted(names)})")
        folds = [f for f in folds if f.name in cfg.eval.only_folds or set(f.test_slides) & set(cfg.eval.only_folds)]
    if loaded is None:
        loaded = load_and_embed(cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        dump_config(cfg, out / "config.yaml")
    set_cpu_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    fold_results = []
    for fi, fold in enumerate(folds):
        t_fold = time.perf_counter()
        fdir = out / "folds" / fold.name
        fdir.mkdir(parents=True, exist_ok=True)
        done = fdir / "result.json"
        if resume and done.is_file():
            fold_results.append(json.loads(done.read_text()))
            log.info("fold %s: already done, reusing %s", fold.name, done)
            continue
        log.info("fold %d/%d %s: train %s, test %s%s", fi + 1, len(folds), fold.name, fold.train_slides,
                 fold.test_slides, " (patient-disjoint)" if fold.patient_disjoint else "")
        panel, graphs, train_full, val_masks, scaler, train_s, val_s = prepare_training(
            cfg, loaded, fold.train_slides, fold.test_slides)
        test_graphs = [graphs[s] for s in fold.test_slides]
        ens = fit_ensemble(cfg, panel, train_s, val_s, val_masks, test_graphs, fdir, resume=resume, device=device,
                           progress=progress)
        p_test = {s: scaler.inverse(p) for s, p in zip(fold.test_slides, ens["test"])}
        y_test = {s: graphs[s].y.numpy() for s in fold.test_slides}
        subsets = {"all": panel.genes, "heg50": panel.top("heg", cfg.eval.n_heg), "hvg50": panel.top("hvg", cfg.eval.n_hvg)}
        m = evaluate(y_test, p_test, panel.genes, subsets)
        result = {**fold.to_dict(), "best_epochs": [f.best_epoch for f in ens["fits"]],
                  "val_pcc_members": [f.best_score for f in ens["fits"]], "val_pcc_ensemble": ens["val_score"],
                  "blend_alpha": ens["alpha"], "train_seconds": sum(f.seconds for f in ens["fits"]),
                  "nodes_per_second": float(np.mean([f.nodes_per_second for f in ens["fits"]])),
                  "epochs_run": [len(f.history) for f in ens["fits"]],
                  "genes": {k: list(v) for k, v in subsets.items()}}
        result.update({k: m[k] for k in SUMMARY_KEYS})
        result["per_slide"] = m["per_slide"]
        result["per_gene"] = m["per_gene"]
        if cfg.eval.ridge:
            x_tr = np.concatenate([g.x.numpy() for g in train_full])
            y_tr = np.concatenate([g.y.numpy() for g in train_full])
            rp = ridge_baseline(x_tr, y_tr, {s: graphs[s].x.numpy() for s in fold.test_slides}, cfg.seed)
            rm = evaluate(y_test, rp, panel.genes, subsets)
            result["ridge"] = {k: rm[k] for k in SUMMARY_KEYS}
        if main:
            atomic_torch_save(checkpoint(cfg, ens, panel, scaler, loaded.encoder, int(train_s[0].x.shape[1]),
                                         fold.to_dict()), fdir / "model.pt")
        for s in fold.test_slides if main else []:
            _write_prediction(out / "predictions" / f"{s}.h5ad", loaded.adatas[s], y_test[s], p_test[s], panel.genes,
                              loaded.encoder["name"], graphs[s].x.numpy(), cfg, fold, result)
        result["fold_seconds"] = time.perf_counter() - t_fold
        if main:
            atomic_write_json(done, result)
        fold_results.append(result)
        log.info("fold %s: PCC HEG50 per slide %.3f (ridge %.3f), all %.3f, blend alpha %s, %.1f s", fold.name,
                 result["pcc_heg50_per_slide"], result.get("ridge", {}).get("pcc_heg50_per_slide", float("nan")),
                 result["pcc_all_per_slide"], ens["alpha"], result["fold_seconds"])
    if cfg.eval.final_model:
        fit_final(cfg, loaded, out / "final", resume=resume, device=device, progress=progress, main=main)
    metrics = summarise(fold_results)
    metrics["gnnst_version"] = __version__
    metrics["config"] = config_to_dict(cfg)
    metrics["seconds_total"] = time.perf_counter() - t_all
    metrics["embedding_timings"] = dict(loaded.timer.totals)
    if main:
        atomic_write_json(out / "metrics.json", metrics)
    if main and cfg.eval.figures:
        _write_figures(out)
    return metrics


def checkpoint(cfg: "Config", ens: dict, panel, scaler: TargetScaler, encoder: dict, in_dim: int, fold: dict) -> dict:
    """The ``model.pt`` payload: everything :mod:`gnnst.inference` needs to predict a new slide."""
    from gnnst.config import config_to_dict

    return {"model_state": ens["states"][0], "model_states": ens["states"], "blend_alpha": ens["alpha"],
            "model_name": cfg.model.name, "model_cfg": config_to_dict(cfg.model), "in_dim": in_dim,
            "panel": panel.to_dict(), "scaler": scaler.to_dict(), "encoder": encoder,
            "patch_size_um": cfg.patch.size_um, "graph": {"k": cfg.graph.k, "radius_um": cfg.graph.radius_um},
            "expression": config_to_dict(cfg.expression),
            "train": {"num_hops": cfg.train.num_hops, "batch_nodes": cfg.train.batch_nodes},
            "fold": fold, "gnnst_version": __version__}


def prepare_training(cfg: "Config", loaded, train_slides: list[str], test_slides: list[str]) -> tuple:
    """What a fit needs, from ``train_slides`` only: ``(panel, graphs, train_full, val_masks, scaler,
    train_s, val_s)``. The panel and the target scaling come from the training spots; validation
    blocks are carved from the training slides; ``graphs`` also holds ``test_slides`` (unscaled)."""
    from gnnst.data.expression import select_panel
    from gnnst.graph.dataset import make_graphs
    from gnnst.train.trainer import carve_validation, node_subgraph

    panel = select_panel([loaded.adatas[s] for s in train_slides], cfg.expression)
    graphs = make_graphs(loaded, cfg, panel, list(train_slides) + list(test_slides))
    train_full = [graphs[s] for s in train_slides]
    val_masks = carve_validation(train_full, cfg.train.val_fraction, cfg.seed)
    train_parts = [node_subgraph(g, ~m) for g, m in zip(train_full, val_masks)]
    scaler = TargetScaler(np.concatenate([g.y.numpy() for g in train_parts]))
    train_s = [_to_tensor_graph(g, scaler) for g in train_parts]
    val_s = [_to_tensor_graph(g, scaler) for g in train_full]
    return panel, graphs, train_full, val_masks, scaler, train_s, val_s


def fit_final(cfg: "Config", loaded, fdir: Path, *, resume: bool, device, progress: bool, main: bool = True) -> Path:
    """Train on every slide of ``loaded`` exactly as a fold trains on its training slides and write
    ``fdir/model.pt`` (``fold.name == "final"``, no test slides). With ``resume`` a finished one is kept."""
    from gnnst.io import atomic_torch_save

    path = fdir / "model.pt"
    if resume and path.is_file():
        log.info("final model: already trained, reusing %s", path)
        return path
    slides = [e.slide_id for e in loaded.entries]
    log.info("final model: training on all %d slides (%s)", len(slides), ", ".join(slides))
    t0 = time.perf_counter()
    fdir.mkdir(parents=True, exist_ok=True)
    panel, _, _, val_masks, scaler, train_s, val_s = prepare_training(cfg, loaded, slides, [])
    ens = fit_ensemble(cfg, panel, train_s, val_s, val_masks, [], fdir, resume=resume, device=device,
                       progress=progress)
    info = {"name": "final", "train_slides": slides, "test_slides": [], "patient_disjoint": False,
            "val_pcc_ensemble": ens["val_score"], "blend_alpha": ens["alpha"]}
    if main:
        atomic_torch_save(checkpoint(cfg, ens, panel, scaler, loaded.encoder, int(train_s[0].x.shape[1]), info), path)
    log.info("final model: %s (validation PCC %.3f, blend alpha %s, %.1f s)", path, ens["val_score"], ens["alpha"],
             time.perf_counter() - t0)
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


BLEND_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # weights of the regression head tried on the validation spots


def fit_ensemble(cfg: "Config", panel, train_s, val_s, val_masks, test_graphs, fdir: Path, *, resume: bool, device,
                 progress: bool) -> dict:
    """Train ``cfg.train.ensemble`` models (seeds ``cfg.seed + i``) and average their predictions.

    The blend between the regression head and retrieval is chosen on the validation spots of the
    training slides (never on the test slides) when ``cfg.train.select_blend``; otherwise the model's
    own ``predict_mode``/``blend_alpha`` is used. Returns ``{'fits', 'states', 'alpha', 'val_score',
    'test'}`` with ``test`` the standardised predictions ``[N_s, G]`` per test graph.
    """
    import dataclasses

    import torch

    from gnnst.models import create_model
    from gnnst.train.trainer import _val_score, fit, predict_graphs

    tc = cfg.train
    modes = ("head", "retrieval") if cfg.model.use_contrastive else ("head",)
    kw = dict(batch_nodes=tc.batch_nodes, num_hops=tc.num_hops, device=device)
    fits, states = [], []
    val_sum = {m: None for m in modes}
    test_sum = {m: None for m in modes}
    for i in range(max(tc.ensemble, 1)):
        mcfg = dataclasses.replace(cfg, seed=cfg.seed + i)
        torch.manual_seed(mcfg.seed)
        model = create_model(cfg.model.name, in_dim=train_s[0].x.shape[1], num_genes=len(panel.genes), cfg=cfg.model)
        fits.append(fit(model, train_s, val_s, val_masks, mcfg, ckpt_dir=fdir / f"member{i}", resume=resume,
                        device=device, progress=progress))
        states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
        for m in modes:
            v = predict_graphs(model, val_s, mode=m, **kw)
            t = predict_graphs(model, test_graphs, mode=m, **kw)
            val_sum[m] = v if val_sum[m] is None else [a + b for a, b in zip(val_sum[m], v)]
            test_sum[m] = t if test_sum[m] is None else [a + b for a, b in zip(test_sum[m], t)]
    n = len(fits)
    val_avg = {m: [a / n for a in val_sum[m]] for m in modes}
    test_avg = {m: [a / n for a in test_sum[m]] for m in modes}
    val_y = [g.y.numpy()[mk] for g, mk in zip(val_s, val_masks)]

    def mix(preds: dict, a: float) -> list[np.ndarray]:
        if "retrieval" not in preds:
            return preds["head"]
        return [a * h + (1 - a) * r for h, r in zip(preds["head"], preds["retrieval"])]

    if "retrieval" not in modes:
        alpha = 1.0
    elif tc.select_blend and sum(len(v) for v in val_y) > 1:
        scores = {a: _val_score(val_y, [p[mk] for p, mk in zip(mix(val_avg, a), val_masks)]) for a in BLEND_ALPHAS}
        alpha = max(scores, key=lambda a: (scores[a], a))
        log.info("blend weight of the head chosen on validation spots: %s (scores %s)", alpha,
                 {a: round(v, 4) for a, v in scores.items()})
    else:
        alpha = {"head": 1.0, "retrieval": 0.0}.get(cfg.model.predict_mode, cfg.model.blend_alpha)
    val_score = _val_score(val_y, [p[mk] for p, mk in zip(mix(val_avg, alpha), val_masks)]) if val_y else float("nan")
    return {"fits": fits, "states": states, "alpha": alpha, "val_score": val_score, "test": mix(test_avg, alpha)}


def summarise(fold_results: list[dict]) -> dict:
    """Summary over folds: per-slide figures average over held-out slides; pooled and error figures
    average the folds' own (each fold pools its held-out spots over its own panel)."""
    def per_slide_mean(results, key):
        vals = [v[key] for r in results for v in r["per_slide"].values()]
        return float(np.nanmean(vals)) if vals else float("nan")

    def block(results, src=None):
        if not results:
            return {}
        get = (lambda r, k: r[k]) if src is None else (lambda r, k: r[src][k])
        return {k: float(np.nanmean([get(r, k) for r in results])) for k in SUMMARY_KEYS}

    summary = block(fold_results)
    # per-slide figures weigh every held-out slide once, whatever the fold sizes
    for sub in ("heg50", "hvg50", "all"):
        summary[f"pcc_{sub}_per_slide"] = per_slide_mean(fold_results, f"pcc_{sub}")
    disjoint = [r for r in fold_results if r["patient_disjoint"]]
    out = {
        "summary": summary,
        "summary_patient_disjoint": block(disjoint),
        "baselines": {"ridge": block(fold_results, "ridge") if all("ridge" in r for r in fold_results) else {}},
        "folds": fold_results,
        "train_seconds_per_fold": float(np.mean([r["train_seconds"] for r in fold_results])) if fold_results else 0.0,
    }
    return out


def _write_prediction(path: Path, adata, y: np.ndarray, p: np.ndarray, genes, encoder: str, emb: np.ndarray,
                      cfg, fold, result: dict) -> None:
    """Held-out slide as AnnData: measured (normalised) expression in ``X``, predictions in
    ``layers['gnnst_pred']``, pixels in ``obsm['spatial']``, embeddings in ``obsm['X_img_<encoder>']``."""
    import anndata as ad
    import pandas as pd

    from gnnst.config import config_to_dict
    from gnnst.io import atomic_write_h5ad

    obs = pd.DataFrame(index=pd.Index(adata.obs_names, name=keys.BARCODE))
    obs[keys.SLIDE_ID] = pd.Categorical(adata.obs[keys.SLIDE_ID].astype(str))
    a = ad.AnnData(X=y.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    a.layers[keys.PRED] = p.astype(np.float32)
    a.obsm[keys.SPATIAL] = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)
    enc_key = "".join(c if c.isalnum() or c in "-_" else "_" for c in encoder)
    a.obsm[keys.img_key(enc_key)] = emb.astype(np.float32)
    a.uns[keys.UNS_GNNST] = {
        "version": __version__, "fold": fold.name, "patient_disjoint": fold.patient_disjoint,
        keys.MPP: adata.uns[keys.UNS_GNNST][keys.MPP], "X": "normalize_total + log1p of measured counts",
        keys.IMAGE_PATH: _abs_or_none(adata.uns[keys.UNS_GNNST].get(keys.IMAGE_PATH)),
        keys.IMAGE_SCALEF: adata.uns[keys.UNS_GNNST].get(keys.IMAGE_SCALEF, 1.0),
        "config": json.dumps(config_to_dict(cfg)),
        "metrics": json.dumps({k: result[k] for k in SUMMARY_KEYS}),
    }
    atomic_write_h5ad(a, path)


def _abs_or_none(path: str | None) -> str | None:
    return None if not path else str(Path(path).resolve())
