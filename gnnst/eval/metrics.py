"""Per-gene metrics: Pearson per slide then averaged, and pooled over all held-out spots."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pearson_per_gene(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pearson r per column of ``y`` and ``p`` ``[N, G]`` -> ``[G]``; NaN where either is constant."""
    y = y - y.mean(0)
    p = p - p.mean(0)
    den = np.sqrt((y * y).sum(0) * (p * p).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (y * p).sum(0) / den
    return np.where(den > 0, r, np.nan)


def spearman_per_gene(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Spearman rho per column (Pearson of average ranks) ``[G]``."""
    from scipy.stats import rankdata

    return pearson_per_gene(rankdata(y, axis=0), rankdata(p, axis=0))


def _mean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def evaluate(
    y: dict[str, np.ndarray], p: dict[str, np.ndarray], genes: Sequence[str], subsets: dict[str, Sequence[str]]
) -> dict:
    """Metrics of predictions ``p`` against measurements ``y``, both ``{slide: [N_s, G]}``.

    Args:
        genes: column names of every array.
        subsets: named gene subsets (e.g. ``{'all': genes, 'heg50': [...], 'hvg50': [...]}``).

    Returns:
        ``{'pcc_<subset>_per_slide', 'pcc_<subset>_pooled', 'spearman_<subset>_per_slide', 'mse', 'mae',
        'per_gene': {gene: {'pcc_pooled', 'pcc_per_slide'}}, 'per_slide': {slide: {...}}}``.
        Per-slide figures average the per-gene correlation over genes, then over slides; pooled figures
        correlate over all held-out spots at once. Genes constant on a slide are left out of its mean.
    """
    idx = {g: i for i, g in enumerate(genes)}
    slides = list(y)
    r_slide = {s: pearson_per_gene(y[s], p[s]) for s in slides}
    rho_slide = {s: spearman_per_gene(y[s], p[s]) for s in slides}
    Y = np.concatenate([y[s] for s in slides])
    P = np.concatenate([p[s] for s in slides])
    r_pool = pearson_per_gene(Y, P)
    out: dict = {}
    for name, sub in subsets.items():
        cols = np.array([idx[g] for g in sub], dtype=int)
        out[f"pcc_{name}_per_slide"] = float(np.nanmean([_mean(r_slide[s][cols]) for s in slides]))
        out[f"pcc_{name}_pooled"] = _mean(r_pool[cols])
        out[f"spearman_{name}_per_slide"] = float(np.nanmean([_mean(rho_slide[s][cols]) for s in slides]))
    out["mse"] = float(((Y - P) ** 2).mean())
    out["mae"] = float(np.abs(Y - P).mean())
    out["per_slide"] = {
        s: {**{f"pcc_{n}": _mean(r_slide[s][[idx[g] for g in sub]]) for n, sub in subsets.items()},
            "mse": float(((y[s] - p[s]) ** 2).mean()), "mae": float(np.abs(y[s] - p[s]).mean()),
            "spots": int(len(y[s]))}
        for s in slides
    }
    out["per_gene"] = {g: {"pcc_pooled": _nan_to_none(r_pool[i]),
                           "pcc_per_slide": _nan_to_none(np.nanmean([r_slide[s][i] for s in slides])
                                                         if any(np.isfinite(r_slide[s][i]) for s in slides) else np.nan)}
                       for g, i in idx.items()}
    return out


def _nan_to_none(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)
