"""Grid layout on hand-placed boxes and masks: exact points, hexagonal spacing, tissue-only selection."""

import numpy as np
import pytest

from gnnst.data.grid import grid_points, tissue_grid
from gnnst.data.tissue import TissueMask
from gnnst.errors import GnnstError


def test_square_grid_exact_points():
    xy, colrow = grid_points((0, 0, 40, 30), pitch_px=10, kind="square")
    xs, ys = [5, 15, 25, 35], [5, 15, 25]
    assert xy.tolist() == [[x, y] for y in ys for x in xs]  # row by row
    assert colrow.tolist() == [[c, r] for r in range(3) for c in range(4)]


def test_square_grid_is_anchored_to_the_image_origin():
    xy, colrow = grid_points((12, 12, 40, 30), pitch_px=10, kind="square")
    assert xy.tolist() == [[x, y] for y in (15, 25) for x in (15, 25, 35)]
    assert colrow[0].tolist() == [1, 1]


def test_hex_grid_rows_offset_and_six_neighbours_at_pitch():
    from scipy.spatial import cKDTree

    xy, colrow = grid_points((0, 0, 200, 200), pitch_px=20, kind="hex")
    dy = 20 * np.sqrt(3) / 2
    assert np.allclose(xy[colrow[:, 1] == 0, 1], 10) and np.allclose(xy[colrow[:, 1] == 1, 1], 10 + dy)
    assert xy[colrow[:, 1] == 0, 0].min() == 10 and xy[colrow[:, 1] == 1, 0].min() == 20  # odd rows shifted
    d, _ = cKDTree(xy).query(xy, k=7)
    interior = (xy[:, 0] > 40) & (xy[:, 0] < 160) & (xy[:, 1] > 40) & (xy[:, 1] < 160)
    assert np.allclose(d[interior, 1:], 20)  # six neighbours at the pitch


def test_grid_rejects_bad_kind_and_pitch():
    with pytest.raises(GnnstError, match="--grid must be one of"):
        grid_points((0, 0, 10, 10), pitch_px=2, kind="triangle")
    with pytest.raises(GnnstError, match="pitch"):
        grid_points((0, 0, 10, 10), pitch_px=0)


def _mask(rows, cols, on):
    m = np.zeros((rows, cols), dtype=bool)
    m[on] = True
    return TissueMask(mask=m, thumbnail=np.zeros((rows, cols, 3), np.uint8), scale=(0.1, 0.1), threshold=0.1)


def test_tissue_grid_keeps_points_on_tissue_only():
    # mask pixel = 10 x 10 full-res px; tissue = mask rows 2..3, cols 1..4 -> pixels x 10..50, y 20..40
    t = _mask(6, 8, (slice(2, 4), slice(1, 5)))
    xy, bc = tissue_grid(t, width=80, height=60, pitch_px=10, kind="square")
    assert xy.tolist() == [[x, y] for y in (25, 35) for x in (15, 25, 35, 45)]
    assert bc == [f"{c}x{r}" for r in (2, 3) for c in (1, 2, 3, 4)]


def test_tissue_grid_errors_name_the_problem():
    with pytest.raises(GnnstError, match="no tissue detected"):
        tissue_grid(_mask(4, 4, (slice(0, 0),)), width=40, height=40, pitch_px=10)
    with pytest.raises(GnnstError, match="smaller --grid-um"):  # one mask pixel of tissue, pitch far larger
        tissue_grid(_mask(40, 40, (slice(1, 2), slice(1, 2))), width=400, height=400, pitch_px=300)


def test_cell_offsets_spread_inside_the_cell():
    from gnnst.data.grid import cell_offsets

    assert cell_offsets(10, kind="hex", supersample=1).tolist() == [[0.0, 0.0]]
    hex4 = cell_offsets(20, kind="hex", supersample=2)
    dy = 20 * np.sqrt(3) / 2
    assert np.allclose(sorted(map(tuple, hex4)), sorted((sx * 5, sy * dy / 4) for sx in (-1, 1) for sy in (-1, 1)))
    assert np.allclose(hex4.mean(0), 0)  # centred on the spot
    assert (np.linalg.norm(hex4, axis=1) < 10).all()  # inside the hexagon's inscribed circle
    sq9 = cell_offsets(30, kind="square", supersample=3)
    assert np.allclose(sorted(set(np.round(sq9[:, 0], 9))), [-10, 0, 10]) and len(sq9) == 9
    with pytest.raises(GnnstError, match="--supersample must be an integer >= 1"):
        cell_offsets(10, supersample=0)
