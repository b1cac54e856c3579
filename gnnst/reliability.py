"""How far to trust a prediction: per gene, per spot and per region, from what training already computes.

Three pieces, each fitted on the training slides only and carried by the
:class:`~gnnst.predictor.TrainedModel` (``cv``, ``calibration``, ``ood_reference``):

- :class:`GeneReliability`: per gene of the panel, the cross-validated PCC of the run that produced the
  model (mean and sd over held-out slides, mean over the slides of patient-disjoint folds) and whether
  it reaches a threshold (``reliability.reliable_pcc``). Only a run's final model has these numbers; a
  fold model says why it has none (its own held-out slides are its estimate, in ``metrics.json``).
- :func:`ensemble_sd` and :class:`Calibration`: the spread (sd, ``ddof=1``) of the ensemble members'
  predictions per spot and gene, and ONE scale factor ``s`` fitted on the validation spots of the
  training slides so that ``pred +- z * s * sd`` covers ``reliability.interval_level`` of their
  measured values there (``z`` of a normal at that level). A single-member model has no spread: no
  ``sd``, no calibration, and its outputs say so.
- :class:`OODReference`: a seeded subsample of the training spots' features (at most
  ``reliability.ood_reference``, float16, L2-normalised). A spot's score is the mean cosine distance of
  its features to the ``k`` nearest reference spots, divided by the median of the same distance among
  reference spots measured leave-one-slide-out (each against the other training slides' spots; with a
  single training slide, leave-one-out), so 1 is a typical training spot seen from a new slide. A spot is
  flagged when its score exceeds the ``reliability.ood_quantile`` quantile of the reference spots' own
  scores. The features are those the model reads (:meth:`TrainedModel.features`).

Numbers here are fitted on training data; the held-out figures that say whether they mean anything
(Spearman of |error| and sd, coverage, flagged fraction) are defined in :mod:`gnnst.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError
from gnnst.sampling import sample_parts

if TYPE_CHECKING:
    import pandas as pd

GENE_DEFINITION = ("var['gnnst_cv_pcc']: Pearson r of the gene on each held-out slide of the cross-validation "
                   "run the model came from (folds whose panel held the gene), mean over those slides; "
                   "'gnnst_cv_pcc_sd': their sd (ddof=1); 'gnnst_cv_pcc_new_patient': the mean over the slides of "
                   "patient-disjoint folds; 'gnnst_reliable': gnnst_cv_pcc >= threshold (NaN: False)")
SD_DEFINITION = ("layers['gnnst_sd']: sd (ddof=1) over the ensemble members' predictions of each spot and gene, in "
                 "the units of layers['gnnst_pred']; the interval pred +- z * scale * sd covered `level` of the "
                 "validation spots' measured values of the training slides")
OOD_DEFINITION = ("obs['gnnst_ood_score']: mean cosine distance of the spot's features (the patch embedding the "
                  "model reads) to its k nearest training spots, divided by the median of that distance among "
                  "the training spots measured leave-one-slide-out (1 = a typical training spot seen from a new "
                  "slide); obs['gnnst_ood']: score above the `quantile` quantile of the training spots' own scores")
_EPS = 1e-12


# ------------------------------------------------------------------------------------ per gene
@dataclass
class GeneReliability:
    """Per-gene reliability of a model's panel (see the module docstring).

    Attributes:
        genes: the panel, in order.
        cv_pcc, cv_pcc_sd, cv_pcc_new_patient: ``[G]`` float, NaN where there is no estimate.
        reliable: ``[G]`` bool, ``cv_pcc >= threshold``.
        threshold: the PCC a gene needs.
        note: where the numbers come from, or why there are none.
    """

    genes: list[str]
    cv_pcc: np.ndarray
    cv_pcc_sd: np.ndarray
    cv_pcc_new_patient: np.ndarray
    reliable: np.ndarray
    threshold: float
    note: str

    @classmethod
    def from_cv(cls, cv: dict | None, genes: Sequence[str], threshold: float, *, fold: str | None = None
                ) -> "GeneReliability":
        """From :attr:`TrainedModel.cv` (``None``: NaN everywhere and a note saying why); ``fold`` names the
        model's cross-validation fold when it is a fold model (it held slides out)."""
        if not -1.0 <= threshold <= 1.0:
            raise GnnstError(f"reliability threshold (a PCC) must be in [-1, 1], got {threshold}")
        genes = [str(g) for g in genes]
        nan = np.full(len(genes), np.nan)
        if cv is None:
            note = (f"none: fold model '{fold}' carries no cross-validated PCC (its held-out slides' scores are in "
                    "the run's metrics.json; a held-out slide never rates its own fold's model)"
                    if fold else "none: the model was trained without cross-validation")
            return cls(genes, nan, nan.copy(), nan.copy(), np.zeros(len(genes), bool), float(threshold), note)
        at = {str(g): i for i, g in enumerate(cv["genes"])}

        def column(name: str) -> np.ndarray:
            vals = cv.get(name) or []
            return np.array([np.nan if g not in at or vals[at[g]] is None else float(vals[at[g]]) for g in genes])

        pcc = column("pcc_mean")
        with np.errstate(invalid="ignore"):
            reliable = np.nan_to_num(pcc, nan=-np.inf) >= threshold
        n_slides = max((int(v) for v in cv.get("n_slides", []) if v is not None), default=0)
        return cls(genes, pcc, column("pcc_sd"), column("pcc_patient_disjoint"), reliable, float(threshold),
                   f"cross-validated on up to {n_slides} held-out slides of the run that trained the model")

    @property
    def n_reliable(self) -> int:
        return int(self.reliable.sum())

    @property
    def n_estimated(self) -> int:
        """Genes with a cross-validated PCC."""
        return int(np.isfinite(self.cv_pcc).sum())

    def frame(self) -> "pd.DataFrame":
        """The ``var`` columns, indexed by gene."""
        import pandas as pd

        return pd.DataFrame({keys.CV_PCC: self.cv_pcc.astype(np.float32), keys.CV_PCC_SD: self.cv_pcc_sd.astype(np.float32),
                             keys.CV_PCC_NEW_PATIENT: self.cv_pcc_new_patient.astype(np.float32),
                             keys.RELIABLE: self.reliable.astype(bool)}, index=pd.Index(self.genes))

    def summary(self) -> dict:
        """What ``uns['gnnst']['reliability']['genes']`` records."""
        return {"threshold": self.threshold, "n_reliable": self.n_reliable, "n_genes": len(self.genes),
                "n_estimated": self.n_estimated, "source": self.note, "definition": GENE_DEFINITION}


# ------------------------------------------------------------------------------------ per spot
def normal_z(level: float) -> float:
    """``z`` with ``P(|N(0, 1)| <= z) = level``."""
    from scipy.stats import norm

    if not 0.0 < level < 1.0:
        raise GnnstError(f"interval level must be in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2.0))


def ensemble_sd(members: np.ndarray | None) -> np.ndarray | None:
    """sd (``ddof=1``) over the members ``[M, N, G]`` -> ``[N, G]`` float32; ``None`` for fewer than 2."""
    if members is None or len(members) < 2:
        return None
    return np.asarray(members, dtype=np.float64).std(0, ddof=1).astype(np.float32)


@dataclass(frozen=True)
class Calibration:
    """One scale factor for the ensemble spread (see the module docstring).

    Attributes:
        scale: ``s``; ``pred +- z * s * sd`` is the interval of nominal coverage ``level``.
        level: the nominal coverage it was fitted to (on the validation spots).
        z: the normal quantile of ``level`` (1.645 for 0.9).
        n_values: validation (spot, gene) values it was fitted on.
        members: ensemble size whose spread it scales.
    """

    scale: float
    level: float
    z: float
    n_values: int
    members: int

    @classmethod
    def fit(cls, y: np.ndarray, pred: np.ndarray, sd: np.ndarray, *, level: float, members: int) -> "Calibration | None":
        """Fit ``s`` so that ``|y - pred| <= z * s * sd`` holds for a fraction ``level`` of the values
        (``y``, ``pred``, ``sd`` ``[N, G]``: validation spots of the training slides); ``None`` when there is
        nothing to fit on."""
        y, pred, sd = (np.asarray(a, dtype=np.float64) for a in (y, pred, sd))
        if y.size == 0:
            return None
        ratio = np.abs(y - pred) / np.maximum(sd, _EPS)  # [N, G]
        z = normal_z(level)
        scale = float(np.quantile(ratio, level)) / z
        if not math.isfinite(scale) or scale <= 0:
            return None
        return cls(scale=scale, level=float(level), z=z, n_values=int(ratio.size), members=int(members))

    def to_dict(self) -> dict:
        return {"scale": self.scale, "level": self.level, "z": self.z, "n_values": self.n_values,
                "members": self.members}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(scale=float(d["scale"]), level=float(d["level"]), z=float(d["z"]), n_values=int(d["n_values"]),
                   members=int(d["members"]))

    def summary(self) -> dict:
        """What ``uns['gnnst']['reliability']['sd']`` records besides the definition."""
        return {**self.to_dict(), "fitted_on": "validation spots of the training slides",
                "interval": f"pred +- {self.z:.4g} * {self.scale:.4g} * sd (nominal {self.level:g})"}


# ------------------------------------------------------------------------------------ per region
def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def knn_distance(query: np.ndarray, ref: np.ndarray, k: int, *, query_group: np.ndarray | None = None,
                 ref_group: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """Mean cosine distance ``[Nq]`` of each unit-norm ``query`` row ``[Nq, D]`` to its ``k`` nearest unit-norm
    ``ref`` rows ``[Nr, D]``, skipping reference rows of the query row's own group when groups are given.
    Memory: ``chunk x Nr`` floats at a time."""
    ref = np.asarray(ref, dtype=np.float32)
    out = np.empty(len(query), dtype=np.float64)
    for start in range(0, len(query), chunk):
        q = np.asarray(query[start:start + chunk], dtype=np.float32)
        d = np.clip(1.0 - q @ ref.T, 0.0, 2.0)  # [c, Nr]
        if query_group is not None:
            d[query_group[start:start + chunk, None] == ref_group[None, :]] = np.inf
        kk = min(k, d.shape[1])
        out[start:start + len(q)] = np.partition(d, kk - 1, axis=1)[:, :kk].mean(1)
    return out


@dataclass
class OODReference:
    """The training spots a new spot is compared with (see the module docstring).

    Attributes:
        features: ``[R, D]`` float16, L2-normalised features of a seeded subsample of the training spots.
        slides: ``[R]`` int, the training slide of each (for the leave-one-slide-out normaliser).
        k: nearest reference spots averaged.
        quantile: flagging quantile of the reference spots' own scores.
        norm: median leave-one-slide-out k-NN distance of the reference spots (the score's unit).
        threshold: scores above it are flagged.
        n_train: training spots the subsample was drawn from.
        method: ``"leave-one-slide-out"`` or ``"leave-one-out"`` (one training slide).
    """

    features: np.ndarray
    slides: np.ndarray
    k: int
    quantile: float
    norm: float
    threshold: float
    n_train: int
    method: str

    @classmethod
    def build(cls, features: Sequence, *, k: int, quantile: float, cap: int, seed: int,
              sizes: Sequence[int] | None = None) -> "OODReference":
        """From the features ``[N_s, D]`` of each training slide (what the model reads), of which a seeded
        sample of ``cap`` spots is kept. ``features``: the arrays, or, with ``sizes`` (each slide's ``N_s``),
        functions returning them: each is called once, one slide at a time, and only its sampled rows are
        kept, so a cohort's features are never held at once (a slide without a sampled spot is not called)."""
        sizes = [len(f) for f in features] if sizes is None else [int(n) for n in sizes]
        n = sum(sizes)
        if n < 2:
            raise GnnstError(f"an OOD reference needs at least 2 training spots, got {n}")
        picks = sample_parts(sizes, cap, seed) or [np.arange(k) for k in sizes]
        parts = []
        for i, (f, rows) in enumerate(zip(features, picks)):
            if len(rows):
                f = f() if callable(f) else f
                if len(f) != sizes[i]:
                    raise GnnstError(f"OOD reference: slide {i} has {len(f)} feature rows, {sizes[i]} were announced")
                parts.append(np.asarray(f[rows], dtype=np.float32))
        allf = np.concatenate(parts)
        slides = np.repeat(np.arange(len(features)), [len(p) for p in picks])
        ref = _unit_rows(allf).astype(np.float16)
        loso = len(np.unique(slides)) > 1
        group = slides if loso else np.arange(len(allf))
        own = knn_distance(ref, ref, k, query_group=group, ref_group=group)
        norm = max(float(np.median(own)), _EPS)
        return cls(features=ref, slides=slides.astype(np.int32), k=int(k), quantile=float(quantile), norm=norm,
                   threshold=float(np.quantile(own / norm, quantile)), n_train=int(n),
                   method="leave-one-slide-out" if loso else "leave-one-out")

    def score(self, features: np.ndarray) -> np.ndarray:
        """OOD score ``[N]`` float32 of spots with features ``[N, D]``."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.features.shape[1]:
            raise GnnstError(f"OOD score: features of shape {list(features.shape)}, the reference has width "
                             f"{self.features.shape[1]}")
        return (knn_distance(_unit_rows(features), self.features, self.k) / self.norm).astype(np.float32)

    def flag(self, score: np.ndarray) -> np.ndarray:
        """``[N]`` bool: out of distribution."""
        return np.asarray(score) > self.threshold

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + self.slides.nbytes)

    def summary(self) -> dict:
        """What ``uns['gnnst']['reliability']['ood']`` records."""
        return {"k": self.k, "quantile": self.quantile, "threshold": self.threshold, "norm": self.norm,
                "reference_spots": int(len(self.features)), "training_spots": self.n_train, "normaliser": self.method,
                "definition": OOD_DEFINITION}

    def to_dict(self) -> dict:
        """Plain data for the model file (tensors, so ``torch.load(weights_only=True)`` reads it)."""
        import torch

        return {"features": torch.from_numpy(np.ascontiguousarray(self.features, dtype=np.float16)),
                "slides": torch.from_numpy(np.ascontiguousarray(self.slides, dtype=np.int32)), "k": self.k,
                "quantile": self.quantile, "norm": self.norm, "threshold": self.threshold, "n_train": self.n_train,
                "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> "OODReference":
        feats, slides = d["features"], d["slides"]
        feats = feats.numpy() if hasattr(feats, "numpy") else np.asarray(feats)
        slides = slides.numpy() if hasattr(slides, "numpy") else np.asarray(slides)
        if feats.ndim != 2 or len(slides) != len(feats):
            raise GnnstError(f"OOD reference: features of shape {list(feats.shape)} for {len(slides)} slide labels")
        return cls(features=feats.astype(np.float16), slides=slides.astype(np.int32), k=int(d["k"]),
                   quantile=float(d["quantile"]), norm=float(d["norm"]), threshold=float(d["threshold"]),
                   n_train=int(d["n_train"]), method=str(d["method"]))


def describe_reliability(meta: dict) -> str:
    """Lines for the command line from ``uns['gnnst']['reliability']`` (the prediction writer's record):
    how many genes pass the threshold, the spread's interval, how many spots are flagged."""
    genes = meta.get("genes", {})
    if genes.get("n_estimated"):
        lines = [f"{genes['n_reliable']} of {genes['n_genes']} genes pass the reliability threshold (cross-validated "
                 f"PCC >= {genes['threshold']:g}; var['{keys.RELIABLE}'])"]
    else:
        lines = [f"gene reliability: {genes.get('source', 'none')}"]
    sd = meta.get("sd")
    lines.append(f"spread: {sd}" if isinstance(sd, str) else
                 f"spread: layers['{keys.SD}'] over {sd['members']} members; interval {sd.get('interval')}")
    ood = meta.get("ood")
    lines.append(f"out of distribution: {ood}" if isinstance(ood, str) else
                 f"out of distribution: {ood['n_flagged']} spots ({100 * ood['fraction_flagged']:.1f}%) flagged in "
                 f"obs['{keys.OOD}'] (score > {ood['threshold']:.3f}, the training spots' {ood['quantile']:g} quantile)")
    return "\n".join(lines)
