"""Patches cut at a physical size (µm) around each spot, resized to the encoder's input.

Two steps, which may run in different places: :func:`read_crops` cuts ``uint8`` regions from the image
(always on the CPU, in a worker process that holds its own image handle: :class:`PatchStream`), and
:func:`to_input` resamples them to the encoder's ``[B, 3, S, S]`` float input on whatever device holds
the tensor (the worker's CPU when the encoder runs on CPU; the GPU otherwise, so that only the small
``uint8`` crops cross to the device).

Whole-image files (JPEG, PNG: no region reads, every open decodes the whole image) are cut again for each
fold when the patches are stain-normalised to the fold's reference; :data:`CROPS` keeps their raw crops
in the process (up to :data:`CROP_CACHE_BYTES`, least recently used out first), so a slide is decoded once
per run, not once per fold (:class:`PatchStream` with ``cache_crops``, :func:`gnnst.data.stain.sample_pixels`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch

    from gnnst.data.images import SlideImage

from torch.utils.data import IterableDataset  # this module is imported only where patches are cut


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


@dataclass
class PatchPlan:
    """Where one slide's patches come from.

    Attributes:
        slide_id: for messages.
        image_path: the image file (each worker opens its own handle).
        xy: spot centres ``[N, 2]`` in full-resolution pixels (x, y).
        side_px: patch side in full-resolution pixels.
        level: pyramid level read from.
        read_px: patch side in pixels of that level (the crops' size).
        pad_value: grey level outside the image.
        transform: applied to the ``uint8`` crops ``[B, r, r, 3]`` before resampling (stain normalisation or
            augmentation, :mod:`gnnst.data.stain`); picklable, with an ``identity`` for the cache key.
    """

    slide_id: str
    image_path: str
    xy: np.ndarray
    side_px: int
    level: int
    read_px: int
    pad_value: int = 255
    transform: object = None

    @classmethod
    def make(cls, slide_id: str, image_path: str, xy: np.ndarray, *, side_px: int, out_size: int,
             downsamples: tuple[float, ...], pad_value: int = 255, transform=None) -> "PatchPlan":
        level = choose_level(downsamples, side_px, out_size)
        read_px = max(int(round(side_px / downsamples[level])), 1)
        return cls(slide_id, str(image_path), np.asarray(xy, dtype=np.float64), side_px, level, read_px, pad_value,
                   transform)


CROP_CACHE_BYTES = 1 << 30  # raw crops of whole-image files kept per process (her2st-6: 170 MB)


class CropCache:
    """Raw (untransformed) ``uint8`` crops ``[N, r, r, 3]`` of whole-image slides, by :meth:`key`, kept up to
    ``budget`` bytes (least recently used out first). Cached arrays are read-only."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.nbytes = 0
        self._items: OrderedDict = OrderedDict()

    @staticmethod
    def key(plan: PatchPlan) -> tuple | None:
        """The identity of ``plan``'s raw crops (file, its size and time, level, sizes, padding, spots), or
        ``None`` when its file reads regions (a pyramid: nothing to save) or cannot be found."""
        from gnnst.data.images import WSI_SUFFIXES
        from gnnst.io import file_identity

        if Path(plan.image_path).suffix.lower() in WSI_SUFFIXES:
            return None
        try:
            file = file_identity(plan.image_path)
        except OSError:
            return None
        xy = hashlib.sha256(np.ascontiguousarray(plan.xy, dtype=np.float64).tobytes()).hexdigest()
        return (file, plan.level, plan.read_px, plan.side_px, plan.pad_value, xy)

    def fits(self, plan: PatchPlan) -> bool:
        """Whether all of ``plan``'s crops fit the budget."""
        return len(plan.xy) * plan.read_px * plan.read_px * 3 <= self.budget

    def get(self, key: tuple | None) -> np.ndarray | None:
        if key is None or key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: tuple | None, crops: np.ndarray) -> None:
        if key is None or crops.nbytes > self.budget:
            return
        if key in self._items:
            self.nbytes -= self._items.pop(key).nbytes
        while self._items and self.nbytes + crops.nbytes > self.budget:
            self.nbytes -= self._items.popitem(last=False)[1].nbytes
        crops.setflags(write=False)
        self._items[key] = crops
        self.nbytes += crops.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


CROPS = CropCache(CROP_CACHE_BYTES)  # this process's


def cached_crops(plan: PatchPlan, *, image: "SlideImage | None" = None, key: tuple | None = None
                 ) -> np.ndarray | None:
    """All of ``plan``'s raw crops ``[N, r, r, 3]`` from :data:`CROPS`, cut and kept there first if they
    are not (``image``: the slide already opened, else opened and closed here; ``key``: its
    :meth:`CropCache.key` when known); ``None`` when the plan's image reads regions or its crops exceed the
    budget (cut them with :func:`read_crops`)."""
    from gnnst.data.images import open_image

    key = key or CropCache.key(plan)
    if key is None or not CROPS.fits(plan):
        return None
    crops = CROPS.get(key)
    if crops is None:
        im = image or open_image(plan.image_path, pad_value=plan.pad_value)
        try:
            crops = read_crops(im, dataclasses.replace(plan, transform=None), slice(None))
        finally:
            if image is None:
                im.close()
        CROPS.put(key, crops)
    return crops


def read_crops(image: "SlideImage", plan: PatchPlan, rows: slice) -> np.ndarray:
    """The ``plan``'s crops of spots ``rows``: ``[B, read_px, read_px, 3]`` uint8 (its ``transform`` applied)."""
    half = plan.side_px / 2.0
    r = plan.read_px
    crops = np.stack([image.read_region(int(round(x - half)), int(round(y - half)), r, r, level=plan.level)
                      for x, y in plan.xy[rows]])
    return crops if plan.transform is None else plan.transform(crops)


def to_input(crops: "torch.Tensor", out_size: int, interpolation: str = "bilinear") -> "torch.Tensor":
    """``[B, r, r, 3]`` uint8 crops -> ``[B, 3, out_size, out_size]`` float in [0, 1], channels-last,
    on the crops' device (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    t = crops.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, r, r]
    r = t.shape[-1]
    if r != out_size:
        t = F.interpolate(t, size=(out_size, out_size), mode=interpolation, antialias=r > out_size,
                          align_corners=False)
    return t.contiguous(memory_format=torch.channels_last)


def iter_patch_batches(
    image: "SlideImage", xy: np.ndarray, *, side_px: int, out_size: int, batch_size: int, level: int | None = None,
    interpolation: str = "bilinear",
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
        interpolation: ``bilinear`` or ``bicubic``.
    """
    import torch

    plan = PatchPlan.make("", str(image.path), xy, side_px=side_px, out_size=out_size,
                          downsamples=image.level_downsamples)
    if level is not None:
        plan.level, plan.read_px = level, max(int(round(side_px / image.level_downsamples[level])), 1)
    for start in range(0, len(xy), batch_size):
        rows = slice(start, min(start + batch_size, len(xy)))
        yield rows, to_input(torch.from_numpy(read_crops(image, plan, rows)), out_size, interpolation)


def split_units(sizes: Sequence[int], *, rows: int, workers: int,
                splittable: Sequence[bool] | None = None) -> list[tuple[int, int, int]]:
    """Work units ``(slide, start, stop)`` in runs of whole ``rows``-sized items.

    A slide read region by region (a whole-slide image: opening it costs nothing) is cut into
    ``ceil(workers / slides)`` units, so that every worker has work even with fewer slides than workers;
    a plain image (``splittable`` false: each worker that reads it decodes all of it) stays one unit.
    """
    workers = max(workers, 1)
    per_slide = -(-workers // max(len(sizes), 1))
    units = []
    for i, n in enumerate(sizes):
        items = -(-n // rows)
        k = max(min(per_slide if splittable is None or splittable[i] else 1, items), 1)
        bounds = [round(j * items / k) * rows for j in range(k + 1)]
        units += [(i, bounds[j], min(bounds[j + 1], n)) for j in range(k) if bounds[j] < n]
    return units


class PatchStream(IterableDataset):
    """Patches of many slides, cut by this process or by ``torch.utils.data.DataLoader`` workers.

    Iterating yields dicts: ``{"slide": i, "start": row, "patches": tensor, "decode": s, "crop": s}``
    with ``patches`` ``[k, 3, S, S]`` float (``resize=True``) or ``[k, r, r, 3]`` uint8 crops
    (``resize=False``: :func:`to_input` runs where the encoder is), ``k <= rows``; or, when a slide
    cannot be read, ``{"error": message}`` and nothing more. Each worker takes every ``num_workers``-th
    unit of :func:`split_units` (whole-slide images shared between workers, plain images not), opens its
    own handle on each image it needs and decodes the next image in a background thread while it cuts
    the current one.

    Args:
        plans: one :class:`PatchPlan` per slide.
        rows: spots per yielded item.
        workers: the DataLoader's ``num_workers`` (0 = this process), to split the work.
        out_size, interpolation: the encoder's input (used when ``resize``).
        resize: resample in the worker (CPU encoders) or leave it to the encoder's device.
        images: slides already opened by the caller (used when ``workers == 0``).
        cache_crops: with ``workers == 0``, whole-image slides' raw crops come from (and go to) :data:`CROPS`,
            for callers that cut the same slides again (a fold's stain-normalised patches).
    """

    def __init__(self, plans: Sequence[PatchPlan], *, rows: int, workers: int, out_size: int,
                 interpolation: str = "bilinear", resize: bool = True, images: dict | None = None,
                 cache_crops: bool = False):
        super().__init__()
        self.cache_crops = cache_crops
        self.plans = list(plans)
        self.rows = rows
        self.out_size = out_size
        self.interpolation = interpolation
        self.resize = resize
        from gnnst.data.images import WSI_SUFFIXES

        self.units = split_units([len(p.xy) for p in self.plans], rows=rows, workers=workers,
                                 splittable=[Path(p.image_path).suffix.lower() in WSI_SUFFIXES for p in self.plans])
        self.images = images or {}

    def _open(self, i: int):
        from gnnst.data.images import open_image

        t0 = time.perf_counter()
        image = self.images.get(i) or open_image(self.plans[i].image_path, pad_value=self.plans[i].pad_value)
        return image, time.perf_counter() - t0

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        mine = self.units[info.id::info.num_workers] if info is not None else self.units
        keep = {}  # slides whose raw crops are served from (and kept in) CROPS: their keys
        if self.cache_crops and info is None:
            keys = {i: CropCache.key(self.plans[i]) for i in dict.fromkeys(i for i, _, _ in mine)}
            keep = {i: k for i, k in keys.items() if k is not None and CROPS.fits(self.plans[i])}
        # slides in the order this worker reads them (those already in CROPS need no image)
        order = [i for i in dict.fromkeys(i for i, _, _ in mine) if i not in keep or CROPS.get(keep[i]) is None]
        pool = ThreadPoolExecutor(max_workers=1)  # decodes the next image while this one is cut
        opening = {order[0]: pool.submit(self._open, order[0])} if order else {}
        image, current, working, held = None, None, None, None
        try:
            for i, start, stop in mine:
                working, decode = i, 0.0
                if i != current:
                    if image is not None and current not in self.images:
                        image.close()
                    image, held, current = None, None, i
                    if i in order:
                        image, decode = (opening.pop(i) if i in opening else pool.submit(self._open, i)).result()
                        nxt = order.index(i) + 1
                        if nxt < len(order):
                            opening[order[nxt]] = pool.submit(self._open, order[nxt])
                    if i in keep:
                        held = cached_crops(self.plans[i], image=image, key=keep[i])
                for a in range(start, stop, self.rows):
                    t0 = time.perf_counter()
                    rows = slice(a, min(a + self.rows, stop))
                    if held is None:
                        raw = read_crops(image, self.plans[i], rows)
                    elif self.plans[i].transform is None:
                        raw = held[rows].copy()  # the cached crops stay read-only
                    else:
                        raw = self.plans[i].transform(held[rows])
                    crops = torch.from_numpy(raw)
                    patches = to_input(crops, self.out_size, self.interpolation) if self.resize else crops
                    yield {"slide": i, "start": a, "patches": patches, "decode": decode,
                           "crop": time.perf_counter() - t0}
                    decode = 0.0
        except Exception as e:  # one line for the user, whatever process this runs in
            where = f"slide '{self.plans[working].slide_id}'" if working is not None else "patches"
            msg = str(e) if isinstance(e, GnnstError) else f"{type(e).__name__}: {e}"
            yield {"error": f"{where}: {msg}"}
        finally:
            if image is not None and current not in self.images:
                image.close()
            for f in opening.values():
                f.cancel()
            pool.shutdown(wait=True)
            for k, f in opening.items():  # decoded ahead but not used (an error stopped this worker)
                if k not in self.images and not f.cancelled() and f.exception() is None:
                    f.result()[0].close()
