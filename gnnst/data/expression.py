"""Expression processing: scanpy normalisation and gene panels chosen from the given slides only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

    from gnnst.config import ExpressionConfig


def normalise(adata: "AnnData", cfg: "ExpressionConfig") -> np.ndarray:
    """Per-spot normalised expression ``[N, G]`` float32 (``normalize_total`` then ``log1p``).

    Per-spot operations only: no statistic crosses spots or slides. ``adata`` is not modified.
    """
    import scanpy as sc
    import scipy.sparse as sp

    tmp = adata.copy()
    tmp.X = sp.csr_matrix(tmp.X, dtype=np.float32)
    sc.pp.normalize_total(tmp, target_sum=cfg.target_sum)
    if cfg.log1p:
        sc.pp.log1p(tmp)
    return np.asarray(tmp.X.toarray(), dtype=np.float32)


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


def select_panel(adatas: Sequence["AnnData"], cfg: "ExpressionConfig") -> GenePanel:
    """Choose the gene panel from ``adatas`` (the training slides) only.

    Genes must be present in every slide and detected (count > 0) in at least
    ``cfg.min_spot_fraction`` of all spots. The panel is the union of the ``n_top_expressed`` genes with
    the highest mean normalised expression and the ``n_top_variable`` most variable genes (scanpy's
    ``highly_variable_genes``, seurat flavour, on the normalised log data, batch-aware across slides).
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    if not adatas:
        raise GnnstError("cannot choose a gene panel from zero slides")
    slides = [str(a.obs["slide_id"].iloc[0]) for a in adatas]
    common = adatas[0].var_names
    for a in adatas[1:]:
        common = common.intersection(a.var_names, sort=False)
    if len(common) == 0:
        raise GnnstError(f"slides {slides} share no gene names")
    X, detected, slide_of_spot = [], [], []
    for a, s in zip(adatas, slides):
        idx = a.var_names.get_indexer(common)
        X.append(normalise(a, cfg)[:, idx])  # normalised over all the slide's genes, as at training
        detected.append(np.asarray((a.X[:, idx] > 0).sum(0)).ravel())
        slide_of_spot += [s] * a.n_obs
    X = np.concatenate(X)  # [N_all, G_common]
    detected = np.sum(detected, axis=0) / len(X)
    keep = detected >= cfg.min_spot_fraction
    if keep.sum() == 0:
        raise GnnstError(f"no gene is detected in {cfg.min_spot_fraction:.0%} of spots of slides {slides}")
    genes = np.asarray(common)[keep]
    X = X[:, keep]
    mean = X.mean(0)
    heg_order = [str(g) for g in genes[np.argsort(-mean, kind="stable")]]
    hv = ad.AnnData(X=X, obs=pd.DataFrame({"slide_id": slide_of_spot}, index=[str(i) for i in range(len(X))]),
                    var=pd.DataFrame(index=genes))
    batch_key = "slide_id" if len(adatas) > 1 else None
    sc.pp.highly_variable_genes(hv, flavor="seurat", n_top_genes=min(cfg.n_top_variable, hv.n_vars),
                                batch_key=batch_key)
    disp = np.nan_to_num(hv.var["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)
    # scanpy's batch-aware ranking: slides calling a gene variable first, then normalised dispersion
    nbatches = hv.var.get("highly_variable_nbatches", pd.Series(0, index=hv.var_names)).to_numpy()
    hvg_order = [str(g) for g in genes[np.lexsort((-disp, -nbatches))]]
    heg = heg_order[: cfg.n_top_expressed]
    hvg = hvg_order[: cfg.n_top_variable]
    panel = heg + [g for g in hvg if g not in set(heg)]
    return GenePanel(genes=panel, heg=heg, hvg=hvg, source_slides=slides)


def panel_expression(adata: "AnnData", panel: GenePanel, cfg: "ExpressionConfig", *, file: str = "") -> np.ndarray:
    """Normalised expression ``[N, len(panel.genes)]`` of ``adata`` (normalised over all its genes).

    A panel gene absent from ``adata`` (count matrices often drop genes with no counts) is all zero;
    a warning names how many. If none of the panel's genes is present it is an error.
    """
    import logging

    idx = adata.var_names.get_indexer(panel.genes)
    missing = [g for g, i in zip(panel.genes, idx) if i < 0]
    if len(missing) == len(panel.genes):
        raise GnnstError(f"{file or 'slide'}: none of the {len(panel.genes)} panel genes is measured "
                         f"(e.g. '{panel.genes[0]}')")
    if missing:
        logging.getLogger("gnnst").warning("%s: %d of %d panel genes not in the count matrix (taken as 0), e.g. %s",
                                           file or "slide", len(missing), len(panel.genes), missing[0])
    Y = normalise(adata, cfg)
    out = np.zeros((adata.n_obs, len(panel.genes)), dtype=np.float32)
    out[:, idx >= 0] = Y[:, idx[idx >= 0]]
    return out
