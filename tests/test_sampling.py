"""gnnst.sampling.sample_parts: the one seeded subsample behind every cohort cap."""

from __future__ import annotations

import numpy as np

from gnnst.sampling import sample_parts


def test_every_row_up_to_the_limit_then_a_seeded_sample_over_all_parts():
    assert sample_parts([3, 0, 5], None, 0) is None and sample_parts([3, 0, 5], 8, 0) is None
    picks = sample_parts([3, 0, 5], 4, 0)
    assert [len(p) for p in picks][1] == 0 and sum(len(p) for p in picks) == 4
    assert all(np.all(np.diff(p) > 0) and (len(p) == 0 or p.max() < n) for p, n in zip(picks, [3, 0, 5]))
    assert all(np.array_equal(a, b) for a, b in zip(picks, sample_parts([3, 0, 5], 4, 0)))  # seeded
    # the rows a flat draw of the same seed picks, cut at the parts' boundaries
    flat = np.sort(np.random.default_rng(0).choice(8, size=4, replace=False))
    assert np.array_equal(np.concatenate([picks[0], picks[2] + 3]), flat)
    # uniform over all rows, not per part: a part of 1 row is drawn 1/10 of the time at limit 5 of 50
    hits = sum(len(sample_parts([1, 49], 5, s)[0]) for s in range(2000)) / 2000
    assert abs(hits - 0.1) < 0.03


def test_sample_masks_draws_among_the_true_entries():
    from gnnst.sampling import sample_masks

    masks = [np.array([1, 0, 1, 1], bool), np.zeros(3, bool), np.array([0, 1, 1, 0, 1], bool)]  # 6 entries
    assert sample_masks(masks, 6, 0) is None and sample_masks(masks, None, 0) is None
    got = sample_masks(masks, 4, 0)
    assert [len(g) for g in got] == [4, 3, 5] and sum(int(g.sum()) for g in got) == 4
    assert all((g <= m).all() for g, m in zip(got, masks))
    picks = sample_parts([3, 0, 3], 4, 0)  # the same draw, over the entries' ranks
    assert [np.flatnonzero(g).tolist() for g in got] == [np.flatnonzero(m)[p].tolist() for m, p in zip(masks, picks)]
