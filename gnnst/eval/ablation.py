"""Neighbourhood ablation: the same cross-validation for several spot graphs, and "no graph".

Each setting of ``cfg.ablation.settings`` is one full :func:`~gnnst.eval.crossval.run_crossval`
(same folds, panels, seeds and embeddings; slides are read and embedded once for all settings) with:

- ``"none"``: ``model.use_graph=false`` (spot-only model; the graph is built but never used);
- ``"k=<int>"``: each spot's ``k`` nearest spots (``graph.radius_um=null``);
- ``"r=<µm>"``: every spot within the radius (``graph.k=null``);
- ``"k=<int>,r=<µm>"``: both;

and ``train.ensemble=cfg.ablation.ensemble``, no figures; the baselines of ``eval.baselines`` run in the
first setting only (``ablation.baselines``). The table's figures are those of :mod:`gnnst.metrics`
(:data:`~gnnst.metrics.ABLATION_COLUMNS`, pooled across folds as every run computes it). Writes into ``out``: ``config.yaml``,
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
    return out


def setting_config(cfg: "Config", setting: Setting, *, baselines: bool) -> "Config":
    """``cfg`` with the setting's graph, ``ablation.ensemble`` models per fold, no figures, and the
    baselines of ``eval.baselines`` only when ``baselines``."""
    from gnnst.config import Config, _from_dict, _merge, config_to_dict, parse_overrides

    over = setting.overrides() + [f"train.ensemble={cfg.ablation.ensemble}", "eval.figures=false",
                                  "eval.final_model=false"]  # a comparison of settings: no model to ship
    if not baselines:
        over.append("eval.baselines=[]")
    return _from_dict(Config, _merge(config_to_dict(cfg), parse_overrides(over)))


def run_ablation(cfg: "Config", out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> list[dict]:
    """Run every setting of ``cfg.ablation`` and write the table and the plot; returns the table rows.
    ``resume`` and ``overwrite``: as :func:`gnnst.eval.crossval.run_crossval`, for the whole ablation
    folder (:class:`gnnst.outputs.RunFolder`)."""
    from gnnst.graph.dataset import load_and_embed, resolve_patch_size
    from gnnst.io import atomic_write_json
    from gnnst.outputs import ABLATION, RunFolder

    t0 = time.perf_counter()
    out = Path(out)
    settings = parse_settings(cfg)
    resolve_patch_size(cfg)  # the number itself is compared and recorded
    folder = RunFolder(out, ABLATION, cfg, resume=resume, overwrite=overwrite)  # checks only: before any work
    resume = folder.resume
    ks = [(f"the setting '{st.name}' of ablation.settings", st.k) for st in settings if st.k is not None]
    if not all(st.use_graph for st in settings):  # "none" builds the graph of graph.k (never used by the model)
        ks.append((f"graph.k={cfg.graph.k} (built, unused, in the setting 'none')", cfg.graph.k))
    loaded = load_and_embed(cfg, progress=progress, graph_ks=ks)  # read + embed once (from the cache when warm)
    load_seconds = time.perf_counter() - t0
    folder.begin()
    results = []
    for i, st in enumerate(settings):
        sdir = out / "settings" / st.slug
        scfg = setting_config(cfg, st, baselines=cfg.ablation.baselines and i == 0)
        timing_file = sdir / "ablation_timing.json"
        if resume and (sdir / "metrics.json").is_file():
            log.info("setting %s: already done, reusing %s", st.name, sdir / "metrics.json")
            metrics = json.loads((sdir / "metrics.json").read_text())
            saved = json.loads(timing_file.read_text()) if timing_file.is_file() else \
                {"seconds": metrics.get("seconds_total"), "cpu_seconds": None}
            timing = {k: _number(saved.get(k)) for k in ("seconds", "cpu_seconds")}
        else:
            from gnnst.eval.crossval import run_crossval

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
    from gnnst.graph.edges import slide_graph

    if not setting.use_graph:
        return 0.0
    edges = nodes = 0
    for a in loaded.adatas.values():
        g = slide_graph(a.obsm[keys.SPATIAL], float(a.uns[keys.UNS_GNNST][keys.MPP]), k=cfg.graph.k,
                        radius_um=cfg.graph.radius_um)
        edges += g.edge_index.shape[1]
        nodes += len(g.pos)
    return edges / max(nodes, 1)


def _number(v) -> float:
    """A number read back from JSON, where one that was not finite is ``null`` (gnnst.metrics)."""
    return float("nan") if v is None else float(v)


def _ms(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _slide_values(folds: list[dict], key: str, baseline: str | None = None) -> dict[str, float]:
    """Held-out slide -> its score ``key`` (a per-slide figure of :mod:`gnnst.metrics`, e.g.
    ``pcc_heg_per_slide``), of the model or of ``baseline``."""
    from gnnst.metrics import slide_score_key

    sk = slide_score_key(key)
    out = {}
    for f in folds:
        block = f if baseline is None else f["baselines"][baseline]
        out.update({s: v[sk] for s, v in block["per_slide"].items()})
    return out


def _row(row: dict, folds: list[dict], summary: dict, none: dict, baseline: str | None = None) -> dict:
    """Fill ``row`` with the ablation columns of one method: per-slide figures as mean ± sd over the held-out
    slides (the mean is the run's summary figure), the paired difference to "none", the pooled figures."""
    from gnnst.metrics import ABLATION_COLUMNS

    for key in ABLATION_COLUMNS:
        if key.endswith("_pooled"):
            row[key] = summary.get(key, float("nan"))
        else:
            row[f"{key}_mean"], row[f"{key}_sd"] = _ms(list(_slide_values(folds, key, baseline).values()))
    own = _slide_values(folds, "pcc_heg_per_slide", baseline)
    # paired with "no graph" slide by slide: the slide-to-slide spread cancels
    paired = [v - none[s] for s, v in own.items() if s in none]
    row["delta_heg_vs_none_mean"], row["delta_heg_vs_none_sd"] = _ms(paired) if none else (np.nan, np.nan)
    for kind, n in summary.get("n_genes_pooled", {}).items():
        row[f"n_genes_pooled_{kind}"] = n
    return row


def ablation_rows(results: list[dict]) -> list[dict]:
    """One row per setting (and one per baseline of the first setting): the columns of
    :data:`gnnst.metrics.ABLATION_COLUMNS`, each per-slide figure as mean and sd over held-out slides."""
    rows = []
    none_res = next((r for r in results if not r["setting"].use_graph), None)
    none = _slide_values(none_res["metrics"]["folds"], "pcc_heg_per_slide") if none_res else {}
    for res in results:
        st, m = res["setting"], res["metrics"]
        folds = m["folds"]
        row = {"setting": st.name, "k": st.k, "radius_um": st.radius_um, "use_graph": st.use_graph,
               "neighbours_per_spot": res["degree"], "slides": int(m["summary"].get("slides", 0))}
        _row(row, folds, m["summary"], none)
        row["train_seconds"] = float(sum(f["train_seconds"] for f in folds))
        row["seconds"] = float(res["seconds"])
        row["cpu_seconds"] = float(res.get("cpu_seconds", float("nan")))
        rows.append(row)
    first = results[0]["metrics"] if results else {}
    for b, summary in first.get("baselines", {}).items():
        row = {"setting": b, "k": None, "radius_um": None, "use_graph": b == "ridge_neighbours",
               "neighbours_per_spot": 0.0, "slides": int(summary.get("slides", 0))}
        rows.append(_row(row, first["folds"], summary, none, baseline=b))
    return rows


def csv_columns() -> tuple[str, ...]:
    """Columns of ``ablation.csv``, from :data:`gnnst.metrics.ABLATION_COLUMNS`."""
    from gnnst.metrics import ABLATION_COLUMNS, SUBSET_KINDS

    figures = []
    for key in ABLATION_COLUMNS:
        figures += [key] if key.endswith("_pooled") else [f"{key}_mean", f"{key}_sd"]
    return (("setting", "k", "radius_um", "use_graph", "neighbours_per_spot", "slides") + tuple(figures)
            + ("delta_heg_vs_none_mean", "delta_heg_vs_none_sd")
            + tuple(f"n_genes_pooled_{k}" for k in SUBSET_KINDS) + ("train_seconds", "seconds", "cpu_seconds"))


def _f(v, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def write_table(rows: list[dict], out: Path, *, cfg: "Config", timing: dict) -> None:
    """``ablation.csv`` (every column) and ``ablation.md`` (the table for the README); columns, labels and
    definitions from :mod:`gnnst.metrics`.

    ``timing``: ``seconds`` and ``cpu_seconds`` summed over the settings, ``load_seconds`` (reading and
    embedding, once).
    """
    import pandas as pd

    from gnnst.eval.baselines import LABELS
    from gnnst.io import atomic_path, atomic_write_text
    from gnnst.metrics import ABLATION_COLUMNS, MetricSet

    ms = MetricSet.from_config(cfg.eval)
    columns = csv_columns()
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows])
    with atomic_path(out / "ablation.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")
    n_slides = rows[0]["slides"] if rows else 0
    heg = ms.subset_label("heg")
    first_pooled = next(i for i, k in enumerate(ABLATION_COLUMNS) if k.endswith("_pooled"))
    keys = list(ABLATION_COLUMNS[:first_pooled]) + ["delta"] + list(ABLATION_COLUMNS[first_pooled:])
    delta_label = f"Δ {ms.label('pcc_heg_per_slide')} vs none (paired)"
    head = ["setting", "neighbours/spot"] + [delta_label if k == "delta" else ms.label(k) for k in keys] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        name = {"none": "none (no graph)"}.get(r["setting"], LABELS.get(r["setting"], r["setting"]))
        pm = lambda key: f"{_f(r[key + '_mean'])} ± {_f(r[key + '_sd'])}"  # noqa: E731

        def cell(k: str) -> str:
            if k == "delta":
                return "–" if r["setting"] == "none" else pm("delta_heg_vs_none")
            return _f(r.get(k)) if k.endswith("_pooled") else pm(k)

        cells = [name, _f(r["neighbours_per_spot"], ".1f")] + [cell(k) for k in keys] + [_f(r.get("train_seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    pooled = next((r for r in rows if "n_genes_pooled_heg" in r), {})
    lines += [
        "",
        f"Mean ± sd over the {n_slides} held-out slides ({cfg.eval.folds} folds; each fold's panel and {heg} chosen "
        f"on its training slides); {cfg.ablation.ensemble} model(s) per fold. Δ: per-slide difference to \"none\" "
        f"(same folds, seeds and panels). Pooled: {ms.definition('pcc_heg_pooled')}; here "
        f"{pooled.get('n_genes_pooled_heg', '?')} {heg} / {pooled.get('n_genes_pooled_all', '?')} panel genes. "
        f"Train s: training time summed over folds. Wall time {timing['seconds'] / 60:.1f} min for "
        f"the settings + {timing['load_seconds']:.0f} s reading the slides and cached embeddings once; CPU time "
        f"(user + system, all threads) {_f(timing['cpu_seconds'] / 60, '.1f')} min.",
    ]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")


def plot_ablation(rows: list[dict], path: Path) -> None:
    """PCC (mean ± sd over held-out slides) against k and against radius; "no graph" and the baselines as
    reference lines."""
    from gnnst.eval.baselines import LABELS
    from gnnst.eval.figures import agg_figure
    from gnnst.io import atomic_path

    ks = sorted((r for r in rows if r["k"] is not None and r["radius_um"] is None), key=lambda r: r["k"])
    rs = sorted((r for r in rows if r["radius_um"] is not None and r["k"] is None), key=lambda r: r["radius_um"])
    both = [r for r in rows if r["k"] is not None and r["radius_um"] is not None]
    refs = {r["setting"]: r for r in rows if not (r["k"] or r["radius_um"])}  # "none" and the baselines
    panels = [(p, lab, x) for p, lab, x in ((ks, "k nearest spots", "k"), (rs, "radius (µm)", "radius_um")) if p]
    if both:
        panels.append((both, "k and radius", None))
    panels = panels or [([], "setting", None)]
    fig = agg_figure(figsize=(4.6 * len(panels) + 0.6, 7.8))
    axes = fig.subplots(2, len(panels), squeeze=False, sharey="row", gridspec_kw={"height_ratios": [1.6, 1]})
    series = (("pcc_heg_per_slide", "top HEG", "#1b9e77", "o"), ("pcc_all_per_slide", "all panel genes",
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
            for b, ls in (("ridge", ":"), ("ridge_neighbours", "-.")):
                if b in refs:
                    ax.axhline(refs[b][f"{key}_mean"], color=colour, ls=ls, lw=1.1, label=f"{LABELS[b]}, {name}")
        for xi, r in zip(x, pts):
            ax.annotate(f"{r['neighbours_per_spot']:.1f} nbrs", (xi, r["pcc_heg_per_slide_mean"]),
                        textcoords="offset points", xytext=(0, 9), ha="center", fontsize=7, color="#555555")
        if len(pts):
            axd.errorbar(x, [r["delta_heg_vs_none_mean"] for r in pts],
                         yerr=[r["delta_heg_vs_none_sd"] for r in pts], color="#1b9e77", marker="o", capsize=3, lw=1.5)
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
    axes[0, 0].set_ylabel("PCC per held-out slide\n(mean ± sd over slides)")
    axes[1, 0].set_ylabel("Δ PCC top HEG vs no graph\n(paired per slide, mean ± sd)")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("neighbourhood ablation: leave-one-out cross-validation (nbrs = mean neighbours per spot)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
