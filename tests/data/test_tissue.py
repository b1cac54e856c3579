"""Tissue detection on drawn images: a stained blob on white glass, specks, holes, a blank slide."""

import numpy as np
import pytest

from gnnst.data.tissue import tissue_mask

PINK = (215, 120, 185)


def _disk(img, cx, cy, r, colour):
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour


def test_blob_found_speck_dropped_hole_filled():
    img = np.full((200, 300, 3), 245, np.uint8)
    _disk(img, 100, 100, 60, PINK)  # tissue: 60 px = 600 µm radius at 10 µm/px
    _disk(img, 100, 100, 8, (250, 250, 250))  # a small unstained hole inside it (0.02 mm^2)
    _disk(img, 250, 40, 3, PINK)  # a speck (0.003 mm^2)
    mask, thr = tissue_mask(img, um_per_px=10.0)
    assert 0.05 <= thr <= 0.6
    assert mask[100, 100] and mask[100, 150] and mask[60, 100]  # centre (hole filled), inside
    assert not mask[40, 250]  # speck removed
    assert not mask[10, 10] and not mask[190, 290]  # glass
    yy, xx = np.mgrid[:200, :300]
    disk = (xx - 100) ** 2 + (yy - 100) ** 2 <= 60 ** 2
    assert (mask == disk).mean() > 0.99


def test_pale_septa_between_fat_cells_are_tissue():
    img = np.full((200, 200, 3), 245, np.uint8)
    img[50:150, 50:150] = PINK
    img[60:140:12, 60:140] = (240, 235, 240)  # white fat lobules separated by thin stained septa
    mask, _ = tissue_mask(img, um_per_px=10.0)
    assert mask[60:140, 60:140].all()


def test_blank_slide_gives_empty_mask():
    mask, thr = tissue_mask(np.full((50, 60, 3), 250, np.uint8), um_per_px=5.0)
    assert not mask.any() and thr == pytest.approx(0.05)
