"""Every figure gnnst reports, its label and its definition, in one place.

The summary printed by ``gnnst train``, ``metrics.json``, the README table, the ablation table and the
benchmarks take their columns (:data:`SUMMARY_COLUMNS`, :data:`ABLATION_COLUMNS`,
:data:`BENCHMARK_COLUMNS`), labels and definition texts (:class:`MetricSet`) from here, and compute the
numbers with :func:`summarise`. A new metric is added here once: a key in :data:`_FIGURES` (or
:data:`_ERRORS`) and its computation in :func:`slide_scores` / :func:`summarise`.

Gene subsets (chosen per fold on the training slides, :func:`report_subsets`): ``heg`` = the top
``eval.n_heg`` highly expressed genes, ``hvg`` = the top ``eval.n_hvg`` highly variable genes
(``eval.hvg``: ``seurat`` or ``variance``), ``all`` = the fold's whole gene panel. Keys name the
kind (``pcc_heg_per_slide``); labels carry ``n`` (``PCC HEG50/slide``).

Figures over a set of folds (:func:`summarise`):

- ``*_per_slide``: per gene within one held-out slide (over its spots), the mean over the subset's
  genes (genes constant on the slide left out), then the mean over held-out slides (each slide once);
- ``pcc_*_pooled``: per gene over the concatenated held-out spots of all the folds, on the subset's
  genes that are in every fold's subset (their number is ``n_genes_pooled[kind]``), then the mean over
  those genes; slide-level shifts count here, so it is lower than per slide when slides differ;
- ``mse``, ``mae``: over one held-out slide's spots and its fold's panel genes (normalised log
  expression), then the mean over held-out slides.

In JSON (``metrics.json``, each fold's ``result.json``, every JSON gnnst writes through
:func:`gnnst.io.atomic_write_json`) a figure that is not a finite number (a PCC over genes that are all
constant, a pooled PCC with no gene in every fold's subset, a time not measured) is written as ``null``,
and the top-level map ``nulls`` (:data:`NULLS`) gives, for the dotted path of each such value
(``"summary.pcc_hvg_per_slide"``, ``"folds[2].per_slide.B4.pcc_hvg"``), the reason
(:func:`null_reason`). The files are strict JSON (no ``NaN``/``Infinity``). Per-gene lists
(``pcc_per_gene``) hold ``null`` where a gene's r is undefined (constant on that slide), without an entry.

Reliability figures (:data:`RELIABILITY_COLUMNS`, :func:`reliability_scores`, :func:`summarise_reliability`):
whether the fold model's ensemble spread and out-of-distribution flags (:mod:`gnnst.reliability`, fitted
on the fold's training slides) mean anything on its held-out slides, whose expression is used for this
scoring only.

Pure numpy/scipy (no torch): the core layer of :mod:`gnnst`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

SUBSET_KINDS = ("heg", "hvg", "all")  # reported gene subsets, in table order
HVG_METHODS = ("seurat", "variance")  # values of eval.hvg

# key template -> (label template, definition template); {s} = subset kind, {S} = its label
_FIGURES = {
    "pcc_{s}_per_slide": ("PCC {S}/slide", "Pearson r of each gene of {D} within each held-out slide (over "
                          "its spots), averaged over the genes (genes constant on the slide left out), then "
                          "over the held-out slides (each slide once)"),
    "pcc_{s}_pooled": ("PCC {S} pooled", "Pearson r of each gene over the held-out spots of all folds "
                       "concatenated, on the genes of {D} that are in every fold's subset (their number: "
                       "n_genes_pooled), averaged over those genes; slide-level shifts count"),
    "spearman_{s}_per_slide": ("Spearman {S}/slide", "as the per-slide PCC, with Spearman's rho (Pearson r "
                               "of average ranks) of each gene of {D}"),
}
_ERRORS = {
    "mse": ("MSE", "mean squared error of the normalised log expression over a held-out slide's spots and "
                   "its fold's panel genes, averaged over the held-out slides"),
    "mae": ("MAE", "mean absolute error, as MSE"),
}


# per held-out slide (reliability_scores), then the mean over held-out slides (summarise_reliability)
RELIABILITY_FIGURES = {
    "sd_error_spearman": ("Spearman(abs err, sd)", "per gene within each held-out slide, Spearman's rho between the "
                          "absolute error |measured - predicted| and the ensemble sd (layers['gnnst_sd']) over the "
                          "slide's spots, averaged over the fold's panel genes (genes where either is constant left "
                          "out), then over the held-out slides; 0 = the sd says nothing about the error"),
    "sd_error_spearman_positive": ("genes rho>0", "fraction of those genes whose rho is above 0, averaged over the "
                                   "held-out slides"),
    "interval_coverage": ("coverage", "fraction of a held-out slide's (spot, gene) values with |measured - predicted| "
                          "<= z * scale * sd, the one scale fitted on the validation spots of the fold's training "
                          "slides to cover the nominal level there (reliability.interval_level; z of a normal at that "
                          "level), averaged over the held-out slides"),
    "interval_halfwidth": ("half-width", "mean of z * scale * sd over a held-out slide's spots and genes (normalised "
                           "log expression), averaged over the held-out slides"),
    "ood_fraction": ("OOD flagged", "fraction of a held-out slide's spots flagged obs['gnnst_ood'] by the fold model "
                     "(score above the reliability.ood_quantile quantile of its training spots' leave-one-slide-out "
                     "scores), averaged over the held-out slides"),
}
RELIABILITY_COLUMNS = tuple(RELIABILITY_FIGURES)


def figure_key(template: str, kind: str) -> str:
    """``figure_key('pcc_{s}_per_slide', 'heg')`` -> ``'pcc_heg_per_slide'``."""
    return template.format(s=kind)


ALL_KEYS = tuple(figure_key(t, k) for t in _FIGURES for k in SUBSET_KINDS) + tuple(_ERRORS)

# the columns of each table, in order (labels and definitions from MetricSet)
SUMMARY_COLUMNS = ("pcc_heg_per_slide", "pcc_hvg_per_slide", "pcc_all_per_slide", "pcc_heg_pooled", "mse", "mae")
ABLATION_COLUMNS = ("pcc_heg_per_slide", "pcc_all_per_slide", "pcc_heg_pooled", "pcc_all_pooled", "mse")
BENCHMARK_COLUMNS = ("pcc_heg_per_slide", "pcc_hvg_per_slide", "pcc_all_per_slide", "pcc_heg_pooled",
                     "pcc_hvg_pooled", "pcc_all_pooled", "mse", "mae")


def slide_score_key(key: str) -> str:
    """The key of a per-slide figure in one slide's scores (:func:`slide_scores`): ``pcc_heg_per_slide``
    -> ``pcc_heg``, ``mse`` -> ``mse``; a pooled figure has none (``KeyError``)."""
    if key in _ERRORS:
        return key
    if key.endswith("_per_slide") and key in ALL_KEYS:
        return key[: -len("_per_slide")]
    raise KeyError(f"'{key}' is not a per-slide figure")


@dataclass(frozen=True)
class MetricSet:
    """Labels and definitions of the reported figures for one run's ``eval`` settings.

    Args:
        n_heg, n_hvg: sizes of the HEG and HVG subsets (``eval.n_heg``, ``eval.n_hvg``).
        hvg: how the HVG are chosen (``eval.hvg``).
    """

    n_heg: int = 50
    n_hvg: int = 50
    hvg: str = "seurat"

    @classmethod
    def from_config(cls, ev: Any) -> "MetricSet":
        """From a :class:`gnnst.config.EvalConfig` (not imported here: gnnst.io writes JSON through this
        module, and gnnst.config writes through gnnst.io)."""
        return cls(n_heg=ev.n_heg, n_hvg=ev.n_hvg, hvg=ev.hvg)

    def subset_label(self, kind: str) -> str:
        """``HEG50``, ``HVG50``, ``all``."""
        return {"heg": f"HEG{self.n_heg}", "hvg": f"HVG{self.n_hvg}", "all": "all"}[kind]

    def subset_definition(self, kind: str) -> str:
        """How a fold's subset ``kind`` is chosen (always on its training slides)."""
        if kind == "heg":
            return (f"the {self.n_heg} panel genes with the highest mean normalised expression on the training "
                    "spots")
        if kind == "hvg":
            how = ("ranked by scanpy's highly_variable_genes (flavour 'seurat', normalised dispersion, batch-aware "
                   "across slides) among the genes detected in at least expression.min_spot_fraction of the "
                   "training spots" if self.hvg == "seurat" else
                   "with the highest variance of the normalised log expression on the training spots, among the "
                   "panel genes (HEST-Benchmark convention)")
            return f"the {self.n_hvg} panel genes {how} (eval.hvg: {self.hvg})"
        return "the fold's whole gene panel"

    def _split(self, key: str) -> tuple[str, str | None]:
        for t in _FIGURES:
            for k in SUBSET_KINDS:
                if figure_key(t, k) == key:
                    return t, k
        if key in _ERRORS:
            return key, None
        raise KeyError(f"unknown metric key '{key}' (known: {', '.join(ALL_KEYS)})")

    def label(self, key: str) -> str:
        """Column title of ``key``, e.g. ``PCC HEG50/slide``."""
        t, kind = self._split(key)
        return _ERRORS[t][0] if kind is None else _FIGURES[t][0].format(S=self.subset_label(kind))

    def definition(self, key: str) -> str:
        """One sentence saying how ``key`` is computed (the subsets: :meth:`subset_definition`)."""
        t, kind = self._split(key)
        return _ERRORS[t][1] if kind is None else _FIGURES[t][1].format(D=self.subset_label(kind))

    def describe(self) -> dict:
        """What ``metrics.json`` records under ``definitions``: every key's label and definition, and
        how the subsets are chosen."""
        return {"metrics": {k: {"label": self.label(k), "definition": self.definition(k)} for k in ALL_KEYS},
                "subsets": {k: {"label": self.subset_label(k), "selection": self.subset_definition(k)}
                            for k in SUBSET_KINDS},
                "hvg": self.hvg}


# ------------------------------------------------------------------------------------ in JSON
NULLS = "nulls"  # top-level key of a JSON file: dotted path of each value written as null -> why

_NULL_REASONS = (  # (pattern of the last key of the path, reason); first match wins
    (r"(pcc|spearman)_(heg|hvg|all)_per_slide", "no gene of the subset varies in both measurement and prediction "
                                                "on any held-out slide (a correlation of a constant is undefined)"),
    (r"pcc_(heg|hvg|all)_pooled", "no gene of the subset is in every fold's subset and varies in both measurement "
                                  "and prediction over the pooled held-out spots"),
    (r"(pcc|spearman)_(heg|hvg|all)", "no gene of the subset varies in both measurement and prediction on this slide"),
    (r"val_pcc.*", "no validation gene varies in both measurement and prediction (or no validation spots)"),
    (r"(mse|mae)", "no finite prediction to compare"),
    (r".*seconds.*", "not measured"),
)


def null_reason(path: str, value: float) -> str:
    """Why the value at ``path`` (dotted, ``summary.pcc_hvg_per_slide``) is not a finite number."""
    last = re.sub(r"\[\d+\]$", "", path.rsplit(".", 1)[-1])
    for pattern, reason in _NULL_REASONS:
        if re.fullmatch(pattern, last):
            return reason
    return f"not a finite number ({value})"


def finite_json(obj):
    """A copy of ``obj`` (dicts, lists, tuples, numbers, strings) for strict JSON: each float that is not
    finite becomes ``None`` and, when ``obj`` is a dict, ``obj[NULLS]`` maps its dotted path to
    :func:`null_reason` (``nulls`` maps already inside ``obj``, e.g. of a fold's ``result.json`` read
    back, are merged into the top-level one with their paths prefixed)."""
    nulls: dict[str, str] = {}

    def walk(v, path: str):
        if isinstance(v, dict):
            if path and isinstance(v.get(NULLS), dict):  # an inner nulls map moves to the top
                nulls.update({f"{path}.{k}": r for k, r in v[NULLS].items()})
                v = {k: x for k, x in v.items() if k != NULLS}
            return {k: walk(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, (float, np.floating)):
            if math.isfinite(v):
                return float(v)
            nulls[path] = null_reason(path, float(v))
            return None
        if isinstance(v, np.integer):
            return int(v)
        return v

    out = walk(obj, "")
    if isinstance(out, dict) and (nulls or isinstance(out.get(NULLS), dict)):
        out[NULLS] = {**(out.get(NULLS) or {}), **nulls}
    return out


# ------------------------------------------------------------------------------------ per gene
def pearson_per_gene(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pearson r per column of ``y`` and ``p`` ``[N, G]`` -> ``[G]``; NaN where either column is constant
    (a constant prediction has no correlation, whatever float rounding of its mean leaves)."""
    y = np.asarray(y)
    p = np.asarray(p)
    const = (np.ptp(y, axis=0) == 0) | (np.ptp(p, axis=0) == 0) if len(y) else np.ones(y.shape[1], bool)
    y = y - y.mean(0)
    p = p - p.mean(0)
    den = np.sqrt((y * y).sum(0) * (p * p).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (y * p).sum(0) / den
    return np.where((den > 0) & ~const, r, np.nan)


def spearman_per_gene(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Spearman rho per column (Pearson r of average ranks) ``[G]``."""
    from scipy.stats import rankdata

    return pearson_per_gene(rankdata(y, axis=0), rankdata(p, axis=0))


def _mean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _none_if_nan(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


# ------------------------------------------------------------------------------------ subsets
def hvg_by_variance(y: np.ndarray, genes: Sequence[str], n: int) -> list[str]:
    """The ``n`` genes with the highest variance of ``y`` ``[N, G]`` (normalised log expression of the
    training spots), highest first; ties keep panel order."""
    var = np.asarray(y, dtype=np.float64).var(0)
    return [str(genes[i]) for i in np.argsort(-var, kind="stable")[:n]]


def report_subsets(genes: Sequence[str], heg_ranked: Sequence[str], hvg_seurat_ranked: Sequence[str],
                   y_train: np.ndarray | None, ms: MetricSet) -> dict[str, list[str]]:
    """The reported gene subsets of one fold, ``{'heg', 'hvg', 'all'}``.

    Args:
        genes: the fold's panel (``all``).
        heg_ranked: panel genes by mean expression on the training spots (``GenePanel.heg``).
        hvg_seurat_ranked: panel genes by scanpy's seurat ranking (``GenePanel.hvg``).
        y_train: ``[N, G]`` normalised expression of the training spots (panel order); needed for
            ``hvg='variance'``.
        ms: subset sizes and the HVG method.
    """
    if ms.hvg == "variance":
        if y_train is None:
            raise ValueError("report_subsets: eval.hvg='variance' needs the training spots' expression")
        hvg = hvg_by_variance(y_train, genes, ms.n_hvg)
    elif ms.hvg == "seurat":
        hvg = list(hvg_seurat_ranked[: ms.n_hvg])
    else:
        raise ValueError(f"eval.hvg must be one of {', '.join(HVG_METHODS)}, got {ms.hvg!r}")
    return {"heg": list(heg_ranked[: ms.n_heg]), "hvg": hvg, "all": list(genes)}


# ------------------------------------------------------------------------------------ scores
def slide_scores(y: np.ndarray, p: np.ndarray, genes: Sequence[str], subsets: Mapping[str, Sequence[str]]) -> dict:
    """Scores of one held-out slide: ``pcc_<kind>`` and ``spearman_<kind>`` (mean over the subset's genes),
    ``mse``, ``mae``, ``spots`` and ``pcc_per_gene`` (``[G]`` in panel order, ``None`` where undefined).

    Shapes: y, p ``[N, G]`` (normalised log expression, columns = ``genes``).
    """
    idx = {g: i for i, g in enumerate(genes)}
    r = pearson_per_gene(y, p)
    rho = spearman_per_gene(y, p)
    out: dict = {}
    for kind, sub in subsets.items():
        cols = np.array([idx[g] for g in sub], dtype=int)
        out[f"pcc_{kind}"] = _mean(r[cols])
        out[f"spearman_{kind}"] = _mean(rho[cols])
    d = np.asarray(y, dtype=np.float64) - np.asarray(p, dtype=np.float64)
    out["mse"] = float((d * d).mean())
    out["mae"] = float(np.abs(d).mean())
    out["spots"] = int(len(y))
    out["pcc_per_gene"] = [_none_if_nan(v) for v in r]
    return out


@dataclass
class FoldPredictions:
    """One fold's held-out measurements and predictions, as :func:`summarise` needs them.

    Attributes:
        name: the fold.
        genes: its panel (columns of every array).
        subsets: its reported subsets (:func:`report_subsets`).
        y, p: slide id -> ``[N_s, G]`` measured and predicted normalised log expression.
        patient_disjoint: no test patient was among the training slides.
    """

    name: str
    genes: list[str]
    subsets: dict[str, list[str]]
    y: dict[str, np.ndarray]
    p: dict[str, np.ndarray]
    patient_disjoint: bool = False
    scores: dict = field(default_factory=dict)  # slide id -> slide_scores (filled on first use)

    def slide_scores(self) -> dict[str, dict]:
        for s in self.y:
            if s not in self.scores:
                self.scores[s] = slide_scores(self.y[s], self.p[s], self.genes, self.subsets)
        return self.scores


def pooled_pcc(folds: Sequence[FoldPredictions], kind: str) -> tuple[float, int]:
    """Pooled PCC across ``folds`` of subset ``kind`` and the number of genes it averages (see the module
    docstring): per gene over the concatenated held-out spots, on the genes in every fold's subset."""
    if not folds:
        return float("nan"), 0
    common = set(folds[0].subsets[kind])
    for f in folds[1:]:
        common &= set(f.subsets[kind])
    genes = [g for g in folds[0].subsets[kind] if g in common]  # first fold's order
    if not genes:
        return float("nan"), 0
    ys, ps = [], []
    for f in folds:
        cols = np.array([f.genes.index(g) for g in genes], dtype=int)
        for s in f.y:
            ys.append(np.asarray(f.y[s], dtype=np.float64)[:, cols])
            ps.append(np.asarray(f.p[s], dtype=np.float64)[:, cols])
    return _mean(pearson_per_gene(np.concatenate(ys), np.concatenate(ps))), len(genes)


def reliability_scores(y: np.ndarray, p: np.ndarray, sd: np.ndarray | None, ood: np.ndarray | None, *,
                       scale: float | None, z: float | None) -> dict:
    """The :data:`RELIABILITY_FIGURES` of one held-out slide (``None`` where the model has no sd, no
    calibration or no OOD reference); ``spearman_per_gene``: ``[G]`` rho, ``None`` where undefined.

    Shapes: y, p, sd ``[N, G]`` (normalised log expression); ood ``[N]`` bool.
    """
    out: dict = {k: None for k in RELIABILITY_COLUMNS}
    out["spearman_per_gene"] = None
    if ood is not None:
        out["ood_fraction"] = float(np.mean(ood)) if len(ood) else None
    if sd is None:
        return out
    err = np.abs(np.asarray(y, dtype=np.float64) - np.asarray(p, dtype=np.float64))
    sd = np.asarray(sd, dtype=np.float64)
    rho = spearman_per_gene(err, sd)
    ok = np.isfinite(rho)
    out["sd_error_spearman"] = _none_if_nan(_mean(rho))
    out["sd_error_spearman_positive"] = float(np.mean(rho[ok] > 0)) if ok.any() else None
    out["spearman_per_gene"] = [_none_if_nan(v) for v in rho]
    if scale is not None and z is not None:
        half = z * scale * sd
        out["interval_coverage"] = float(np.mean(err <= half))
        out["interval_halfwidth"] = float(half.mean())
    return out


def summarise_reliability(slides: Sequence[Mapping]) -> dict:
    """Each :data:`RELIABILITY_COLUMNS` figure averaged over held-out slides' :func:`reliability_scores`
    (slides where it is ``None`` left out; ``None`` when none has it), and ``slides`` counted."""
    out: dict = {}
    for k in RELIABILITY_COLUMNS:
        vals = [float(v[k]) for v in slides if v.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["slides"] = len(slides)
    return out


def describe_reliability(level: float) -> dict:
    """Label and definition of every :data:`RELIABILITY_FIGURES` key (``metrics.json``), with the nominal
    coverage ``level`` of the interval."""
    return {k: {"label": lab + (f" (nominal {level:g})" if k == "interval_coverage" else ""), "definition": d}
            for k, (lab, d) in RELIABILITY_FIGURES.items()}


def summarise(folds: Sequence[FoldPredictions]) -> dict:
    """Every figure of :data:`ALL_KEYS` over ``folds`` (definitions: module docstring), plus
    ``n_genes_pooled`` ``{kind: count}`` and ``slides`` (held-out slides counted); ``{}`` without folds."""
    if not folds:
        return {}
    per_slide = [sc for f in folds for sc in f.slide_scores().values()]
    out: dict = {}
    for kind in SUBSET_KINDS:
        for name in ("pcc", "spearman"):
            vals = [v[f"{name}_{kind}"] for v in per_slide if np.isfinite(v[f"{name}_{kind}"])]
            out[f"{name}_{kind}_per_slide"] = float(np.mean(vals)) if vals else float("nan")
    for key in _ERRORS:
        out[key] = float(np.mean([v[key] for v in per_slide]))
    out["n_genes_pooled"] = {}
    for kind in SUBSET_KINDS:
        out[f"pcc_{kind}_pooled"], out["n_genes_pooled"][kind] = pooled_pcc(folds, kind)
    out["slides"] = len(per_slide)
    return out
