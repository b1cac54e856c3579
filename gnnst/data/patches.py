"""Patches cut at a physical size (µm) around each spot, resized to the encoder's input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch

    from gnnst.data.images import SlideImage


def check_inside(xy: np.ndarray, width: int, height: int, *, slide_id: str, barcodes) -> None:
    """Raise naming the first spot whose centre ``xy`` ``[N, 2]`` lies outside the image."""
    bad = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if bad.any():
        i = int(np.where(bad)[0][0])
        raise GnnstError(
            f"slide '{slide_id}': spot '{barcodes[i]}' at pixel ({xy[i, 0]:.1f}, {xy[i, 1]:.1f}) lies outside "
            f"the image ({width} x {height} px); {int(bad.sum())} spot(s) are off the image"
        )


def patch_side_px(size_um: float, mpp: float) -> int:
    """Side in full-resolution pixels of a ``size_um`` patch."""
    return max(int(round(size_um / mpp)), 1)


def choose_level(downsamples: tuple[float, ...], side_px: int, out_size: int) -> int:
    """The coarsest pyramid level at which a ``side_px`` (level-0) patch still spans ``>= out_size`` pixels.

    Level 0 when no level qualifies (the patch is then upsampled from full resolution).
    """
    best = 0
    for level, ds in enumerate(downsamples):
        if side_px / ds >= out_size and ds > downsamples[best]:
            best = level
    return best


def iter_patch_batches(
    image: "SlideImage", xy: np.ndarray, *, side_px: int, out_size: int, batch_size: int, level: int | None = None
) -> Iterator[tuple[slice, "torch.Tensor"]]:
    """Yield ``(rows, patches)`` with patches ``[B, 3, out_size, out_size]`` float32 in [0, 1].

    Only ``batch_size`` patches are in memory at a time, whatever the slide's size.

    Args:
        image: the slide.
        xy: spot centres ``[N, 2]`` in full-resolution pixels (x, y).
        side_px: patch side in full-resolution pixels.
        out_size: encoder input side.
        batch_size: spots per batch.
        level: pyramid level to read from; ``None`` = :func:`choose_level`.
    """
    import torch
    import torch.nn.functional as F

    if level is None:
        level = choose_level(image.level_downsamples, side_px, out_size)
    read_px = max(int(round(side_px / image.level_downsamples[level])), 1)  # patch side at that level
    half = side_px / 2.0
    for start in range(0, len(xy), batch_size):
        rows = slice(start, min(start + batch_size, len(xy)))
        crops = np.stack([
            image.read_region(int(round(x - half)), int(round(y - half)), read_px, read_px, level=level)
            for x, y in xy[rows]
        ])  # [B, read, read, 3] uint8
        t = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, read, read]
        if read_px != out_size:
            t = F.interpolate(t, size=(out_size, out_size), mode="bilinear", antialias=read_px > out_size,
                              align_corners=False)
        yield rows, t.contiguous(memory_format=torch.channels_last)
