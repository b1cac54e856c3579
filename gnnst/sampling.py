"""Seeded subsamples of rows spread over parts (slides): what keeps a fit's banks, validation scores,
baselines and references bounded at cohort scale (``model.retrieval_bank_spots``, ``train.val_spots``,
``eval.baseline_spots``, ``reliability.ood_reference``) while taking every row of a small dataset."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def sample_parts(sizes: Sequence[int], limit: int | None, seed) -> list[np.ndarray] | None:
    """A uniform sample of ``limit`` of the rows of parts of ``sizes`` rows, drawn over all parts at once.

    Returns ``None`` (every row) when the parts hold at most ``limit`` rows, or ``limit`` is ``None``; else,
    per part, the ids ``[k_i]`` (ascending) of its sampled rows, ``sum(k_i) = limit``. ``seed``: anything
    :func:`numpy.random.default_rng` takes; the same seed draws the same rows.
    """
    sizes = [int(n) for n in sizes]
    total = sum(sizes)
    if limit is None or total <= limit:
        return None
    pick = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
    starts = np.cumsum([0, *sizes])  # part i holds the rows starts[i] .. starts[i + 1] - 1
    bounds = np.searchsorted(pick, starts)  # pick[bounds[i]:bounds[i + 1]] fall in part i
    return [pick[bounds[i]:bounds[i + 1]] - starts[i] for i in range(len(sizes))]


def sample_masks(masks: Sequence[np.ndarray], limit: int | None, seed) -> list[np.ndarray] | None:
    """:func:`sample_parts` over the ``True`` entries of ``masks`` (``[N_i]`` bool per part): ``None`` when
    they are at most ``limit`` (or ``limit`` is ``None``), else per part a ``[N_i]`` bool mask of its sampled
    entries (a subset of its mask)."""
    picks = sample_parts([int(np.count_nonzero(m)) for m in masks], limit, seed)
    if picks is None:
        return None
    out = []
    for m, p in zip(masks, picks):
        s = np.zeros(len(m), dtype=bool)
        s[np.flatnonzero(m)[p]] = True
        out.append(s)
    return out
