"""Neighbourhood ablation: the same cross-validation for several spot graphs, and "no graph".

Each setting of ``cfg.ablation.settings`` is one full :func:`~gnnst.train.crossval.run_crossval`
(same folds, panels, seeds and embeddings; slides are read and embedded once for all settings) with:

- ``"none"``: ``model.use_graph=false`` (spot-only model; the graph is built but never used);
- ``"k=<int>"``: each spot's ``k`` nearest spots (``graph.radius_um=null``);
- ``"r=<µm>"``: every spot within the radius (``graph.k=null``);
- ``"k=<int>,r=<µm>"``: both;

and ``train.ensemble=cfg.ablation.ensemble``, no figures. Writes into ``out``: ``config.yaml``,
``settings/<setting>/`` (each a train output folder; per-member checkpoints removed unless
``ablation.keep_checkpoints``), ``ablation.csv``, ``ablation.md`` and ``ablation.png``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from gnnst.config import Config

log = logging.getLogger("gnnst")

_SETTING = re.compile(r"^(?:k=(?P<k>\d+))?(?:,?r=(?P<r>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Setting:
    """One neighbourhood of the ablation, parsed from its name (``"none"``, ``"k=6"``, ``"r=300"``)."""

    name: str
    k: int | None
    radius_um: float | None

    @property
    def use_graph(self) -> bool:
        return self.k is not None or self.radius_um is not None

    @property
    def slug(self) -> str:
        """Folder name: ``none``, ``k6``, ``r300``, ``k6_r300``."""
        parts = ([f"k{self.k}"] if self.k is not None else []) + \
                ([f"r{self.radius_um:g}"] if self.radius_um is not None else [])
        return "_".join(parts) or "none"

    def overrides(self) -> list[str]:
        """Dotted config overrides of this setting."""
        if not self.use_graph:
            return ["model.use_graph=false"]
        k = "null" if self.k is None else str(self.k)
        r = "null" if self.radius_um is None else f"{self.radius_um:g}"
        return ["model.use_graph=true", f"graph.k={k}", f"graph.radius_um={r}"]


def parse_setting(text: str, *, where: str = "ablation.settings") -> Setting:
    """``"none"`` | ``"k=<int>"`` | ``"r=<µm>"`` | ``"k=<int>,r=<µm>"`` -> :class:`Setting`."""
    t = str(text).strip().lower().replace(" ", "")
    if t in ("none", "no_graph", "nograph"):
        return Setting("none", None, None)
    m = _SETTING.match(t)
    if not t or m is None or (m["k"] is None and m["r"] is None):
        raise GnnstError(f"config key '{where}': bad setting {text!r} (use 'none', 'k=6', 'r=300' or 'k=6,r=300')")
    k = int(m["k"]) if m["k"] is not None else None
    r = float(m["r"]) if m["r"] is not None else None
    if (k is not None and k < 1) or (r is not None and r <= 0):
        raise GnnstError(f"config key '{where}': bad setting {text!r} (k >= 1, radius > 0 µm)")
    return Setting(t, k, r)


def parse_settings(cfg: "Config") -> list[Setting]:
    """Every setting of ``cfg.ablation.settings``, checked before anything runs."""
    if not cfg.ablation.settings:
        raise GnnstError("config key 'ablation.settings': empty list")
    out = [parse_setting(s, where=f"ablation.settings[{i}]") for i, s in enumerate(cfg.ablation.settings)]
    slugs = [s.slug for s in out]
    dup = next((s for s in slugs if slugs.count(s) > 1), None)
    if dup is not None:
        raise GnnstError(f"config key 'ablation.settings': setting '{dup}' is listed twice")
    if cfg.ablation.ensemble < 1:
        raise GnnstError(f"config key 'ablation.ensemble': expected an integer >= 1, got {cfg.ablation.ensemble}")
    return out


def setting_config(cfg: "Config", setting: Setting, *, ridge: bool) -> "Config":
    """``cfg`` with the setting's graph, ``ablation.ensemble`` models per fold and no figures."""
    from gnnst.config import Config, _from_dict, _merge, config_to_dict, parse_overrides

    over = setting.overrides() + [f"train.ensemble={cfg.ablation.ensemble}", "eval.figures=false",
                                  "eval.final_model=false",  # a comparison of settings: no model to ship
                                  f"eval.ridge={'true' if ridge else 'false'}"]
    return _from_dict(Config, _merge(config_to_dict(cfg), parse_overrides(over)))


def run_ablation(cfg: "Config", out: str | Path, *, resume: bool = False, progress: bool = True) -> list[dict]:
    """Run every setting of ``cfg.ablation`` and write the table and the plot; returns the table rows."""
    from gnnst.config import dump_config
    from gnnst.graph.dataset import load_and_embed

    from gnnst.io import atomic_write_json

    t0 = time.perf_counter()
    out = Path(out)
    settings = parse_settings(cfg)
    loaded = load_and_embed(cfg, progress=progress)  # read + embed once (from the cache when warm)
    load_seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    results = []
    for i, st in enumerate(settings):
        sdir = out / "settings" / st.slug
        scfg = setting_config(cfg, st, ridge=cfg.ablation.ridge and i == 0)
        timing_file = sdir / "ablation_timing.json"
        if resume and (sdir / "metrics.json").is_file():
            log.info("setting %s: already done, reusing %s", st.name, sdir / "metrics.json")
            metrics = json.loads((sdir / "metrics.json").read_text())
            timing = (json.loads(timing_file.read_text()) if timing_file.is_file()
                      else {"seconds": float(metrics.get("seconds_total", float("nan"))), "cpu_seconds": float("nan")})
        else:
            from gnnst.train.crossval import run_crossval

            log.info("setting %d/%d %s (%s)", i + 1, len(settings), st.name, " ".join(st.overrides()))
            ts, cs = time.perf_counter(), time.process_time()
            metrics = run_crossval(scfg, sdir, resume=resume, progress=progress, loaded=loaded)
            timing = {"seconds": time.perf_counter() - ts, "cpu_seconds": time.process_time() - cs}
            atomic_write_json(timing_file, timing)
            if not cfg.ablation.keep_checkpoints:
                for d in sorted((sdir / "folds").glob("*/member*")):
                    shutil.rmtree(d)
        results.append({"setting": st, "metrics": metrics, **timing, "degree": mean_degree(loaded, scfg, st),
                        "dir": sdir})
    rows = ablation_rows(results)
    write_table(rows, out, cfg=cfg, timing={
        "load_seconds": load_seconds, "seconds": sum(r["seconds"] for r in results),
        "cpu_seconds": sum(r["cpu_seconds"] for r in results)})
    plot_ablation(rows, out / "ablation.png")
    return rows


def mean_degree(loaded, cfg: "Config", setting: Setting) -> float:
    """Mean number of neighbours per spot over all slides (0 for ``"none"``)."""
    from gnnst import keys
    from gnnst.graph.edges import spatial_edges

    if not setting.use_graph:
        return 0.0
    edges = nodes = 0
    for s, a in loaded.adatas.items():
        pos = np.asarray(a.obsm[keys.SPATIAL], dtype=np.float64) * float(a.uns[keys.UNS_GNNST][keys.MPP])
        edges += spatial_edges(pos, k=cfg.graph.k, radius_um=cfg.graph.radius_um).shape[1]
        nodes += len(pos)
    return edges / max(nodes, 1)


def _pooled(sdir: Path, folds: list[dict]) -> dict:
    """Per-gene Pearson over all held-out spots of all folds, averaged over the genes in every fold's
    panel (``all``) and in every fold's top-50 HEG (``heg50``); panels are chosen per fold."""
    import anndata as ad

    from gnnst import keys
    from gnnst.eval.metrics import pearson_per_gene

    all_g = set.intersection(*[set(f["genes"]["all"]) for f in folds])
    heg = set.intersection(*[set(f["genes"]["heg50"]) for f in folds])
    genes = sorted(all_g)
    ys, ps = [], []
    for f in folds:
        for s in f["test_slides"]:
            path = sdir / "predictions" / f"{s}.h5ad"
            if not path.is_file():
                return {}
            a = ad.read_h5ad(path)[:, genes]
            ys.append(np.asarray(a.X, dtype=np.float64))
            ps.append(np.asarray(a.layers[keys.PRED], dtype=np.float64))
    r = pearson_per_gene(np.concatenate(ys), np.concatenate(ps))
    heg_mask = np.isin(genes, sorted(heg))
    return {"pcc_all_pooled": float(np.nanmean(r)), "pcc_heg50_pooled": float(np.nanmean(r[heg_mask])),
            "n_genes_pooled": len(genes), "n_heg_pooled": int(heg_mask.sum())}


def _ms(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def ablation_rows(results: list[dict]) -> list[dict]:
    """One row per setting (and one for the ridge baseline when it ran): mean and sd over folds."""
    rows = []
    none = next((r for r in results if not r["setting"].use_graph), None)
    base = {f["name"]: f for f in none["metrics"]["folds"]} if none else {}
    for res in results:
        st, m = res["setting"], res["metrics"]
        folds = m["folds"]
        row = {"setting": st.name, "k": st.k, "radius_um": st.radius_um, "use_graph": st.use_graph,
               "neighbours_per_spot": res["degree"], "folds": len(folds)}
        for key in ("pcc_heg50_per_slide", "pcc_all_per_slide", "mse"):
            row[f"{key}_mean"], row[f"{key}_sd"] = _ms([f[key] for f in folds])
        # paired with "no graph" fold by fold: the fold-to-fold spread cancels
        paired = [f["pcc_heg50_per_slide"] - base[f["name"]]["pcc_heg50_per_slide"] for f in folds if f["name"] in base]
        row["delta_heg50_vs_none_mean"], row["delta_heg50_vs_none_sd"] = _ms(paired) if none else (np.nan, np.nan)
        row.update(_pooled(res["dir"], folds))
        row["train_seconds"] = float(sum(f["train_seconds"] for f in folds))
        row["seconds"] = float(res["seconds"])
        row["cpu_seconds"] = float(res.get("cpu_seconds", float("nan")))
        rows.append(row)
    first = results[0]["metrics"]["folds"] if results else []
    if first and all("ridge" in f for f in first):
        row = {"setting": "ridge", "k": None, "radius_um": None, "use_graph": False, "neighbours_per_spot": 0.0,
               "folds": len(first)}
        for key in ("pcc_heg50_per_slide", "pcc_all_per_slide", "mse"):
            row[f"{key}_mean"], row[f"{key}_sd"] = _ms([f["ridge"][key] for f in first])
        paired = [f["ridge"]["pcc_heg50_per_slide"] - base[f["name"]]["pcc_heg50_per_slide"] for f in first
                  if f["name"] in base]
        row["delta_heg50_vs_none_mean"], row["delta_heg50_vs_none_sd"] = _ms(paired) if none else (np.nan, np.nan)
        rows.append(row)
    return rows


CSV_COLUMNS = ("setting", "k", "radius_um", "use_graph", "neighbours_per_spot", "folds",
               "pcc_heg50_per_slide_mean", "pcc_heg50_per_slide_sd", "pcc_all_per_slide_mean", "pcc_all_per_slide_sd",
               "delta_heg50_vs_none_mean", "delta_heg50_vs_none_sd", "pcc_heg50_pooled", "pcc_all_pooled",
               "n_heg_pooled", "n_genes_pooled", "mse_mean", "mse_sd", "train_seconds", "seconds", "cpu_seconds")


def _f(v, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def write_table(rows: list[dict], out: Path, *, cfg: "Config", timing: dict) -> None:
    """``ablation.csv`` (every column) and ``ablation.md`` (the table for the README).

    ``timing``: ``seconds`` and ``cpu_seconds`` summed over the settings, ``load_seconds`` (reading and
    embedding, once).
    """
    import pandas as pd

    from gnnst.io import atomic_path, atomic_write_text

    df = pd.DataFrame([{c: r.get(c) for c in CSV_COLUMNS} for r in rows])
    with atomic_path(out / "ablation.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")
    n_folds = rows[0]["folds"] if rows else 0
    lines = [
        "| setting | neighbours/spot | PCC HEG50 per slide | PCC all per slide | Δ HEG50 vs none (paired) "
        "| PCC HEG50 pooled | PCC all pooled | MSE | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = {"none": "none (no graph)", "ridge": "ridge baseline"}.get(r["setting"], r["setting"])
        pm = lambda key: f"{_f(r[key + '_mean'])} ± {_f(r[key + '_sd'])}"  # noqa: E731
        delta = "–" if r["setting"] == "none" else pm("delta_heg50_vs_none")
        lines.append(f"| {name} | {_f(r['neighbours_per_spot'], '.1f')} | {pm('pcc_heg50_per_slide')} | "
                     f"{pm('pcc_all_per_slide')} | {delta} | {_f(r.get('pcc_heg50_pooled'))} | "
                     f"{_f(r.get('pcc_all_pooled'))} | {pm('mse')} | {_f(r.get('train_seconds'), '.0f')} |")
    pooled = next((r for r in rows if "n_genes_pooled" in r), {})
    lines += [
        "",
        f"Mean ± sd over {n_folds} folds ({cfg.eval.folds} folds; each fold's panel and HEG50 chosen on its training "
        f"slides); {cfg.ablation.ensemble} model(s) per fold. Δ: per-fold difference to \"none\" (same folds, "
        f"seeds and panels). Pooled: per-gene Pearson over the held-out spots of all folds, averaged over the "
        f"{pooled.get('n_heg_pooled', '?')} HEG50 / {pooled.get('n_genes_pooled', '?')} panel genes shared by "
        f"every fold. Train s: training time summed over folds. Wall time {timing['seconds'] / 60:.1f} min for "
        f"the settings + {timing['load_seconds']:.0f} s reading the slides and cached embeddings once; CPU time "
        f"(user + system, all threads) {_f(timing['cpu_seconds'] / 60, '.1f')} min.",
    ]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")


def plot_ablation(rows: list[dict], path: Path) -> None:
    """PCC (mean ± sd over folds) against k and against radius; "no graph" and ridge as reference lines."""
    from gnnst.eval.figures import agg_figure
    from gnnst.io import atomic_path

    ks = sorted((r for r in rows if r["k"] is not None and r["radius_um"] is None), key=lambda r: r["k"])
    rs = sorted((r for r in rows if r["radius_um"] is not None and r["k"] is None), key=lambda r: r["radius_um"])
    both = [r for r in rows if r["k"] is not None and r["radius_um"] is not None]
    refs = {r["setting"]: r for r in rows if r["setting"] in ("none", "ridge")}
    panels = [(p, lab, x) for p, lab, x in ((ks, "k nearest spots", "k"), (rs, "radius (µm)", "radius_um")) if p]
    if both:
        panels.append((both, "k and radius", None))
    panels = panels or [([], "setting", None)]
    fig = agg_figure(figsize=(4.6 * len(panels) + 0.6, 7.8))
    axes = fig.subplots(2, len(panels), squeeze=False, sharey="row", gridspec_kw={"height_ratios": [1.6, 1]})
    series = (("pcc_heg50_per_slide", "top-50 HEG", "#1b9e77", "o"), ("pcc_all_per_slide", "all panel genes",
                                                                       "#7570b3", "s"))
    for j, (pts, label, xkey) in enumerate(panels):
        ax, axd = axes[0, j], axes[1, j]
        x = np.array([r[xkey] for r in pts], dtype=float) if xkey else np.arange(len(pts), dtype=float)
        for key, name, colour, marker in series:
            y = np.array([r[f"{key}_mean"] for r in pts])
            e = np.array([r[f"{key}_sd"] for r in pts])
            if len(pts):
                ax.errorbar(x, y, yerr=e, color=colour, marker=marker, capsize=3, lw=1.5, label=f"graph, {name}")
            if "none" in refs:
                ref = refs["none"]
                ax.axhline(ref[f"{key}_mean"], color=colour, ls="--", lw=1.1, label=f"no graph, {name}")
                ax.axhspan(ref[f"{key}_mean"] - ref[f"{key}_sd"], ref[f"{key}_mean"] + ref[f"{key}_sd"], color=colour,
                           alpha=0.07)
            if "ridge" in refs:
                ax.axhline(refs["ridge"][f"{key}_mean"], color=colour, ls=":", lw=1.1, label=f"ridge, {name}")
        for xi, r in zip(x, pts):
            ax.annotate(f"{r['neighbours_per_spot']:.1f} nbrs", (xi, r["pcc_heg50_per_slide_mean"]),
                        textcoords="offset points", xytext=(0, 9), ha="center", fontsize=7, color="#555555")
        if len(pts):
            axd.errorbar(x, [r["delta_heg50_vs_none_mean"] for r in pts],
                         yerr=[r["delta_heg50_vs_none_sd"] for r in pts], color="#1b9e77", marker="o", capsize=3, lw=1.5)
        axd.axhline(0, color="k", lw=0.8, ls="--")
        if xkey is None:
            for a in (ax, axd):
                a.set_xticks(x, [r["setting"] for r in pts])
        else:
            for a in (ax, axd):
                a.set_xticks(x)
        ax.margins(x=0.12)
        axd.margins(x=0.12)
        ax.set_title(f"graph by {label}", fontsize=10)
        axd.set_xlabel(label)
    axes[0, 0].set_ylabel("PCC per held-out slide\n(mean ± sd over folds)")
    axes[1, 0].set_ylabel("Δ PCC HEG50 vs no graph\n(paired per fold, mean ± sd)")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("neighbourhood ablation: leave-one-out cross-validation (nbrs = mean neighbours per spot)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
