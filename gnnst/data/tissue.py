"""Tissue detection on a low-resolution view of a slide: Otsu on saturation, closed, specks and holes removed.

Stained tissue is saturated (pink/purple); glass, blank slide and out-of-scan areas are white or grey.
The mask is computed on a thumbnail, so a whole slide costs a few megapixels whatever its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from gnnst.data.images import SlideImage


@dataclass
class TissueMask:
    """A boolean tissue mask over a downsampled slide.

    Attributes:
        mask: ``[h, w]`` bool, True on tissue.
        thumbnail: ``[h, w, 3]`` uint8 RGB image the mask was computed on.
        scale: mask pixels per full-resolution pixel (x and y).
        threshold: saturation threshold used (Otsu's, or the floor).
    """

    mask: np.ndarray
    thumbnail: np.ndarray
    scale: tuple[float, float]
    threshold: float

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """``[N]`` bool: whether each full-resolution point ``xy`` ``[N, 2]`` (x, y) lies on tissue."""
        h, w = self.mask.shape
        col = np.clip(np.floor(xy[:, 0] * self.scale[0]).astype(np.int64), 0, w - 1)
        row = np.clip(np.floor(xy[:, 1] * self.scale[1]).astype(np.int64), 0, h - 1)
        return self.mask[row, col]

    def bbox(self) -> tuple[float, float, float, float]:
        """Tissue bounding box ``(x0, y0, x1, y1)`` in full-resolution pixels."""
        rows, cols = np.nonzero(self.mask)
        return (cols.min() / self.scale[0], rows.min() / self.scale[1],
                (cols.max() + 1) / self.scale[0], (rows.max() + 1) / self.scale[1])

    @property
    def fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean())


def tissue_mask(
    rgb: np.ndarray,
    *,
    um_per_px: float,
    smooth_um: float = 8.0,
    min_saturation: float = 0.05,
    close_um: float = 100.0,
    min_object_um2: float = 40_000.0,
    max_hole_um2: float = 300_000.0,
) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image and the saturation threshold used.

    Args:
        rgb: ``[h, w, 3]`` uint8 image.
        um_per_px: micrometres per pixel of ``rgb`` (sets the sizes below in pixels).
        smooth_um: Gaussian smoothing of the saturation before thresholding (sigma, µm).
        min_saturation: floor of the threshold, so a blank slide gives an empty mask.
        close_um: morphological closing radius (µm): bridges the thin, pale septa of fat and loose
            stroma, which are tissue although barely stained.
        min_object_um2: tissue pieces smaller than this (µm²) are specks and dropped.
        max_hole_um2: holes smaller than this (µm²) inside tissue are filled.

    Returns:
        ``([h, w] bool mask, threshold)``.
    """
    from skimage.filters import gaussian, threshold_otsu

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise GnnstError(f"tissue detection needs an RGB image [h, w, 3], got shape {rgb.shape}")
    hi = rgb.max(axis=2).astype(np.float32)
    lo = rgb.min(axis=2).astype(np.float32)
    sat = (hi - lo) / np.maximum(hi, 1.0)  # [h, w] HSV saturation in [0, 1]
    sigma = smooth_um / um_per_px
    if sigma >= 0.5:
        sat = gaussian(sat, sigma=sigma)
    thr = min_saturation
    if np.ptp(sat) > 1e-6:
        thr = max(float(threshold_otsu(sat)), min_saturation)
    mask = _close(sat > thr, close_um / um_per_px)
    px2 = um_per_px ** 2
    mask = _drop_small(mask, min_object_um2 / px2)  # specks
    mask = _fill_holes(mask, max_hole_um2 / px2)
    return mask, thr


def _close(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary closing of ``mask`` with a disk of ``radius_px`` (via distance transforms: any radius, linear time)."""
    from scipy import ndimage as ndi

    if radius_px < 1 or not mask.any():
        return mask
    r = int(np.ceil(radius_px))
    padded = np.pad(mask, r)  # so that tissue at the border is not eroded away
    dilated = ndi.distance_transform_edt(~padded) <= radius_px
    closed = ndi.distance_transform_edt(dilated) > radius_px
    return closed[r:-r, r:-r]


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """``mask`` with its enclosed background components of fewer than ``max_px`` pixels set."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    fill = np.bincount(lab.ravel()) < max_px  # [n + 1]
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill[edge] = False  # background reaching the border is glass, not a hole
    fill[0] = False
    return mask | fill[lab]


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` without its 4-connected components of fewer than ``min_px`` pixels."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    keep = np.bincount(lab.ravel()) >= min_px  # [n + 1]
    keep[0] = False
    return keep[lab]


def detect_tissue(
    image: "SlideImage", *, mpp: float, um_per_px: float = 4.0, max_side: int = 2048, **kwargs
) -> TissueMask:
    """Tissue of ``image`` detected on a thumbnail of ``um_per_px`` (coarser if needed to keep its
    longer side at most ``max_side`` pixels).

    The thumbnail is read from the pyramid's low-resolution levels (tile by tile), never from the
    full-resolution image at once. ``kwargs`` go to :func:`tissue_mask`.
    """
    side = min(max_side, int(np.ceil(max(image.width, image.height) * mpp / um_per_px)))
    thumb = image.thumbnail(max(side, 64))  # [h, w, 3]
    scale = (thumb.shape[1] / image.width, thumb.shape[0] / image.height)
    mask, thr = tissue_mask(thumb, um_per_px=mpp / min(scale), **kwargs)
    return TissueMask(mask=mask, thumbnail=thumb, scale=scale, threshold=thr)
