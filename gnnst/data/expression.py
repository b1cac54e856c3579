"""Expression processing: the raw counts a slide contributes (:class:`SlideCounts`), scanpy-exact
normalisation, and gene panels chosen from the given slides only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData
    from scipy.sparse import csr_matrix

    from gnnst.config import ExpressionConfig


NONZERO_SLACK = 1e-9  # candidate genes: a detection fraction this far below the threshold still counts (float rounding)


def normalise_counts(counts: "csr_matrix", totals: np.ndarray, cfg: "ExpressionConfig") -> np.ndarray:
    """Per-spot normalised expression ``[N, G]`` float32 of ``counts``' columns: scanpy's
    ``normalize_total`` (``target_sum``, or the median of ``totals`` when it is ``None``) then ``log1p``,
    with the arithmetic scanpy uses, so the result is bit for bit scanpy's on the whole count matrix.

    Args:
        counts: raw counts ``[N, G]`` (CSR, float32) of some of the slide's genes.
        totals: ``[N]`` float32, each spot's counts summed over EVERY gene the slide measured
            (:attr:`SlideCounts.totals`): the normalisation divides by it, so a column's values do not
            depend on which other columns are kept.

    Per-spot operations only: no statistic crosses spots or slides (the median of ``target_sum: null``
    is over the slide's own spots).
    """
    totals = np.asarray(totals, dtype=np.float32)
    target = np.median(totals) if cfg.target_sum is None else cfg.target_sum
    factor = totals / target  # float32, as scanpy's counts_per_cell / target_sum
    factor = factor + (factor == 0)  # scanpy leaves spots without counts unscaled
    data = counts.data.astype(np.float32) / np.repeat(factor, np.diff(counts.indptr))
    if cfg.log1p:
        np.log1p(data, out=data)
    import scipy.sparse as sp

    out = sp.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape)
    return np.asarray(out.toarray(), dtype=np.float32)


@dataclass
class SlideCounts:
    """The raw counts training needs of one slide: some of its genes (the candidates of a panel, or all),
    and per spot the total over all the genes it measured (what normalisation divides by).

    Attributes:
        slide_id: the slide.
        genes: the columns of ``counts``, in the slide's own gene order.
        counts: ``[N, G]`` raw counts, CSR float32.
        totals: ``[N]`` float32, counts per spot summed over every gene of the slide (scanpy's
            ``normalize_total`` arithmetic: float32 values summed in float64, then float32).

    Built from a slide's AnnData (:meth:`from_anndata`) or read back from a graph folder
    (:class:`gnnst.graph.store.GraphDataset`); either way panels and targets are computed by the
    same code (:func:`select_panel`, :func:`panel_expression`).
    """

    slide_id: str
    genes: list[str]
    counts: "csr_matrix"
    totals: np.ndarray

    def __post_init__(self) -> None:
        self._col = {g: i for i, g in enumerate(self.genes)}

    @property
    def n_obs(self) -> int:
        return int(self.counts.shape[0])

    @classmethod
    def from_anndata(cls, adata: "AnnData", genes: "Sequence[str] | set[str] | None" = None) -> "SlideCounts":
        """The counts of ``genes`` (those the slide measures; ``None``: every gene) of a canonical AnnData."""
        import scipy.sparse as sp

        X = sp.csr_matrix(adata.X, dtype=np.float32)
        totals = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)
        names = [str(g) for g in adata.var_names]
        if genes is not None:
            wanted = set(genes)
            keep = np.fromiter((g in wanted for g in names), dtype=bool, count=len(names))
            X = X[:, np.where(keep)[0]]
            names = [g for g, k in zip(names, keep) if k]
        X.sort_indices()
        return cls(slide_id=str(adata.obs["slide_id"].iloc[0]), genes=names, counts=X.tocsr(), totals=totals)

    def columns(self, genes: Sequence[str]) -> np.ndarray:
        """Column of each of ``genes`` in ``counts`` (-1 where the slide has none)."""
        return np.fromiter((self._col.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))

    def normalised(self, cols: np.ndarray, cfg: "ExpressionConfig") -> np.ndarray:
        """Normalised expression ``[N, len(cols)]`` of columns ``cols`` (all >= 0) (:func:`normalise_counts`)."""
        return normalise_counts(self.counts[:, cols], self.totals, cfg)

    def detected_fraction(self) -> np.ndarray:
        """``[G]``: fraction of the slide's spots in which each column has a count > 0."""
        return np.bincount(self.counts.indices[self.counts.data > 0], minlength=len(self.genes)) / max(self.n_obs, 1)


def candidate_genes(slides: "Sequence[SlideCounts]", min_fraction: float) -> set[str]:
    """Genes detected (count > 0) in at least ``min_fraction`` of the spots of at least one slide.

    A panel chosen on any subset of the slides with ``min_spot_fraction >= min_fraction`` lies among
    them (a pooled detection fraction never exceeds the largest per-slide one), so a graph folder that
    stores only their counts lets every fold choose its panel exactly as from the raw slides.
    """
    out: set[str] = set()
    for s in slides:
        frac = s.detected_fraction()
        out.update(g for g, f in zip(s.genes, frac) if f >= min_fraction - NONZERO_SLACK)
    return out


@dataclass
class GenePanel:
    """Genes predicted by a model, chosen on ``source_slides`` only.

    Attributes:
        genes: the panel, in the order of ``y``'s columns.
        heg: panel genes ranked by mean normalised expression (highest first).
        hvg: panel genes ranked by dispersion (most variable first).
        source_slides: the slides the choice was made on.
    """

    genes: list[str]
    heg: list[str]
    hvg: list[str]
    source_slides: list[str]

    def to_dict(self) -> dict:
        return {"genes": self.genes, "heg": self.heg, "hvg": self.hvg, "source_slides": self.source_slides}

    @classmethod
    def from_dict(cls, d: dict) -> "GenePanel":
        return cls(genes=list(d["genes"]), heg=list(d["heg"]), hvg=list(d["hvg"]),
                   source_slides=list(d["source_slides"]))

    def top(self, kind: str, n: int) -> list[str]:
        """The first ``n`` of ``heg`` or ``hvg``."""
        return list({"heg": self.heg, "hvg": self.hvg}[kind][:n])


PANEL_SEED = 0  # the spots of the highly-variable ranking when expression.panel_spots binds
PANEL_MIN_SPOTS = 10  # ... at least this many of each slide (each slide is a batch of the ranking)


def select_panel(slides: Sequence["SlideCounts | Callable[[], SlideCounts]"], cfg: "ExpressionConfig") -> GenePanel:
    """Choose the gene panel from ``slides`` (the training slides) only.

    Genes must be present in every slide and detected (count > 0) in at least
    ``cfg.min_spot_fraction`` of all spots. The panel is the union of the ``n_top_expressed`` genes with
    the highest mean normalised expression and the ``n_top_variable`` most variable genes (scanpy's
    ``highly_variable_genes``, seurat flavour, on the normalised log data, batch-aware across slides).

    ``slides``: the slides' counts, or functions returning them (read when needed, one at a time).
    Memory: up to ``cfg.panel_spots`` spots in all, a dense ``[spots, genes present in every slide]`` float32
    matrix of them all; above it (a cohort), one slide's at a time plus a seeded sample of about
    ``cfg.panel_spots`` spots for the highly-variable ranking (each slide in proportion, at least
    :data:`PANEL_MIN_SPOTS` of it), detection and mean expression counted over every spot.
    """
    if not slides:
        raise GnnstError("cannot choose a gene panel from zero slides")
    if cfg.panel_spots is None:
        return _select_panel_dense([_read(s) for s in slides], cfg)
    heads, kept, total = [], [], 0  # each slide's id, genes and spots; the slides while they fit the cap
    for s in slides:
        c = _read(s)
        heads.append((c.slide_id, c.genes, c.n_obs))
        total += c.n_obs
        kept = kept if kept is not None and total <= cfg.panel_spots else None
        if kept is not None:
            kept.append(c)
        del c
    if kept is not None:  # at most panel_spots spots: each slide read once
        return _select_panel_dense(kept, cfg)
    return _select_panel_streaming(slides, heads, cfg)


def _read(s: "SlideCounts | Callable[[], SlideCounts]") -> SlideCounts:
    return s() if callable(s) else s


def _common_genes(ids: list[str], names: Sequence[Sequence[str]]):
    """The genes every slide measures, in the first slide's order."""
    import pandas as pd

    common = pd.Index(names[0])
    for n in names[1:]:
        common = common.intersection(pd.Index(n), sort=False)
    if len(common) == 0:
        raise GnnstError(f"slides {ids} share no gene names")
    return common


def _rank_panel(genes: np.ndarray, mean: np.ndarray, X: np.ndarray, slide_of_spot: list[str], n_slides: int,
                cfg: "ExpressionConfig", ids: list[str]) -> GenePanel:
    """The panel from the kept genes' mean expression ``[G]`` (HEG) and the rows ``X`` ``[n, G]`` the
    highly-variable ranking is computed on (their slides ``slide_of_spot``)."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    heg_order = [str(g) for g in genes[np.argsort(-mean, kind="stable")]]
    hv = ad.AnnData(X=X, obs=pd.DataFrame({"slide_id": slide_of_spot}, index=[str(i) for i in range(len(X))]),
                    var=pd.DataFrame(index=genes))
    batch_key = "slide_id" if n_slides > 1 else None
    sc.pp.highly_variable_genes(hv, flavor="seurat", n_top_genes=min(cfg.n_top_variable, hv.n_vars),
                                batch_key=batch_key)
    disp = np.nan_to_num(hv.var["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)
    # scanpy's batch-aware ranking: slides calling a gene variable first, then normalised dispersion
    nbatches = hv.var.get("highly_variable_nbatches", pd.Series(0, index=hv.var_names)).to_numpy()
    hvg_order = [str(g) for g in genes[np.lexsort((-disp, -nbatches))]]
    heg = heg_order[: cfg.n_top_expressed]
    hvg = hvg_order[: cfg.n_top_variable]
    panel = heg + [g for g in hvg if g not in set(heg)]
    return GenePanel(genes=panel, heg=heg, hvg=hvg, source_slides=ids)


def _select_panel_dense(slides: Sequence[SlideCounts], cfg: "ExpressionConfig") -> GenePanel:
    """:func:`select_panel` on every spot at once."""
    ids = [s.slide_id for s in slides]
    common = _common_genes(ids, [s.genes for s in slides])
    X, detected, slide_of_spot = [], [], []
    for s in slides:
        cols = s.columns(list(common))
        X.append(s.normalised(cols, cfg))  # normalised over all the slide's genes, as at training
        detected.append(np.asarray((s.counts[:, cols] > 0).sum(0)).ravel())
        slide_of_spot += [s.slide_id] * s.n_obs
    X = np.concatenate(X)  # [N_all, G_common]
    detected = np.sum(detected, axis=0) / len(X)
    keep = _detected_enough(detected, cfg, ids)
    X = X[:, keep]
    return _rank_panel(np.asarray(common)[keep], X.mean(0), X, slide_of_spot, len(slides), cfg, ids)


def _detected_enough(detected: np.ndarray, cfg: "ExpressionConfig", ids: list[str]) -> np.ndarray:
    keep = detected >= cfg.min_spot_fraction
    if keep.sum() == 0:
        raise GnnstError(f"no gene is detected in {cfg.min_spot_fraction:.0%} of spots of slides {ids}")
    return keep


def _select_panel_streaming(slides: Sequence, heads: list[tuple[str, list[str], int]], cfg: "ExpressionConfig"
                            ) -> GenePanel:
    """:func:`select_panel` one slide at a time (``heads``: each slide's id, genes and spots): detection and
    mean expression (float64 sums) over every spot, the highly-variable ranking on a sample."""
    ids = [h[0] for h in heads]
    common = _common_genes(ids, [h[1] for h in heads])
    sizes = np.array([h[2] for h in heads])
    total = int(sizes.sum())
    share = np.minimum(sizes, np.maximum(PANEL_MIN_SPOTS, np.round(cfg.panel_spots * sizes / total).astype(int)))
    rng = np.random.default_rng(PANEL_SEED)
    detected = np.zeros(len(common), dtype=np.int64)
    sums = np.zeros(len(common), dtype=np.float64)
    sample, slide_of_spot = [], []
    for s, k in zip(slides, share):
        c = _read(s)
        cols = c.columns(list(common))
        x = c.normalised(cols, cfg)  # [n_s, G_common], one slide
        detected += np.asarray((c.counts[:, cols] > 0).sum(0)).ravel()
        sums += x.sum(0, dtype=np.float64)
        sample.append(x[np.sort(rng.choice(c.n_obs, size=int(k), replace=False))])
        slide_of_spot += [c.slide_id] * int(k)
        del c, x
    keep = _detected_enough(detected / total, cfg, ids)
    X = np.concatenate(sample)[:, keep]
    return _rank_panel(np.asarray(common)[keep], (sums / total)[keep], X, slide_of_spot, len(heads), cfg, ids)


def panel_expression(slide: SlideCounts, panel: GenePanel, cfg: "ExpressionConfig", *, file: str = "") -> np.ndarray:
    """Normalised expression ``[N, len(panel.genes)]`` of ``slide`` (normalised over all its genes).

    A panel gene absent from the slide (count matrices often drop genes with no counts) is all zero;
    a warning names how many. If none of the panel's genes is present it is an error.
    """
    import logging

    idx = slide.columns(panel.genes)
    missing = [g for g, i in zip(panel.genes, idx) if i < 0]
    if len(missing) == len(panel.genes):
        raise GnnstError(f"{file or 'slide'}: none of the {len(panel.genes)} panel genes is measured "
                         f"(e.g. '{panel.genes[0]}')")
    if missing:
        logging.getLogger("gnnst").warning("%s: %d of %d panel genes not in the count matrix (taken as 0), e.g. %s",
                                           file or "slide", len(missing), len(panel.genes), missing[0])
    out = np.zeros((slide.n_obs, len(panel.genes)), dtype=np.float32)
    out[:, idx >= 0] = slide.normalised(idx[idx >= 0], cfg)
    return out
