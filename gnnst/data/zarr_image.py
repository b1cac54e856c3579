"""OME-Zarr multiscale images (a SpatialData image element) read by region, lazily.

A SpatialData store keeps its H&E as an image element, an OME-NGFF multiscale group
``<store>.zarr/images/<name>`` of ``(c, y, x)`` arrays, one per pyramid level (``scale0`` = full
resolution). :class:`ZarrPyramid` reads such a group with openslide's interface (levels, dimensions, regions), so
:class:`gnnst.data.images.SlideImage` uses it as the backend of an image folder: level 0 is the
element's full resolution, the other levels are its downscaled copies, and every region is read from
the chunks it touches (decoded chunks are kept in a small LRU cache), never the whole image.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from gnnst.errors import GnnstError

CHUNK_CACHE_BYTES = 512 * 2**20  # decoded chunks kept per open image (least recently used dropped first)


def multiscales(attrs: dict) -> dict | None:
    """The first ``multiscales`` entry of an OME-NGFF group's attributes (NGFF 0.4 or 0.5), or ``None``."""
    ms = attrs.get("ome", {}).get("multiscales") if isinstance(attrs.get("ome"), dict) else None
    ms = ms or attrs.get("multiscales")
    return ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None


class ZarrPyramid:
    """The part of ``openslide.OpenSlide``'s interface that :class:`SlideImage` uses, over an OME-Zarr
    multiscale image: ``dimensions``, ``level_dimensions``, ``level_downsamples``,
    ``get_best_level_for_downsample``, ``read_region`` (RGBA, transparent outside the image), ``close``.

    Args:
        path: the image group (``<store>.zarr/images/<name>``).

    The image must have axes ``c, y, x`` (SpatialData's 2D image) with 3 channels (RGB) or 4 (RGBA;
    the alpha channel is ignored) of ``uint8``.
    """

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        try:
            group = zarr.open_group(str(self.path), mode="r")
            ms = multiscales(dict(group.attrs))
            if ms is None:
                raise GnnstError(f"{self.path}: not an OME-Zarr multiscale image (no 'multiscales' attribute)")
            axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
            self._arrays = [group[d["path"]] for d in ms["datasets"]]
        except GnnstError:
            raise
        except Exception as e:  # zarr/json raise many types for a damaged store
            raise GnnstError(f"{self.path}: cannot read the OME-Zarr image ({type(e).__name__}: {e})") from None
        if axes != ["c", "y", "x"]:
            raise GnnstError(f"{self.path}: image axes are {axes}; gnnst reads 2D images with axes c, y, x")
        first = self._arrays[0]
        if first.dtype != np.uint8 or first.shape[0] not in (3, 4):
            raise GnnstError(f"{self.path}: gnnst reads 8-bit RGB images (3 or 4 channels of uint8), this one has "
                             f"{first.shape[0]} channel(s) of {first.dtype}")
        self.level_dimensions = tuple((int(a.shape[2]), int(a.shape[1])) for a in self._arrays)  # (w, h)
        self.dimensions = self.level_dimensions[0]
        self.level_downsamples = tuple(self.dimensions[0] / w for w, _ in self.level_dimensions)
        self._cache: OrderedDict = OrderedDict()  # (level, cy, cx) -> [3, ch, cw] uint8
        self._cached_bytes = 0

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (openslide's rule)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGBA ``[h, w, 4]`` uint8 of ``size = (w, h)`` level pixels at level-0 ``location = (x, y)``;
        alpha is 0 where the region lies outside the image."""
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        x0, y0 = int(np.floor(location[0] / ds)), int(np.floor(location[1] / ds))  # level pixels
        lw, lh = self.level_dimensions[level]
        out = np.zeros((h, w, 4), dtype=np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
        if xb > xa and yb > ya:
            out[ya - y0:yb - y0, xa - x0:xb - x0, :3] = self._read(level, ya, yb, xa, xb).transpose(1, 2, 0)
            out[ya - y0:yb - y0, xa - x0:xb - x0, 3] = 255
        return out

    def _read(self, level: int, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
        """``[3, yb - ya, xb - xa]`` of ``level``, assembled from (cached) whole chunks."""
        arr = self._arrays[level]
        ch, cw = int(arr.chunks[1]), int(arr.chunks[2])
        out = np.empty((3, yb - ya, xb - xa), dtype=np.uint8)
        for cy in range(ya // ch, (yb - 1) // ch + 1):
            for cx in range(xa // cw, (xb - 1) // cw + 1):
                block = self._chunk(level, cy, cx, ch, cw)
                by0, bx0 = cy * ch, cx * cw
                sy, sx = slice(max(ya, by0), min(yb, by0 + ch)), slice(max(xa, bx0), min(xb, bx0 + cw))
                out[:, sy.start - ya:sy.stop - ya, sx.start - xa:sx.stop - xa] = \
                    block[:, sy.start - by0:sy.stop - by0, sx.start - bx0:sx.stop - bx0]
        return out

    def _chunk(self, level: int, cy: int, cx: int, ch: int, cw: int) -> np.ndarray:
        key = (level, cy, cx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            block = np.asarray(self._arrays[level][:3, cy * ch:(cy + 1) * ch, cx * cw:(cx + 1) * cw])
        except Exception as e:  # a missing or damaged chunk file
            raise GnnstError(f"{self.path}: cannot read image level {level} chunk ({cy}, {cx}) "
                             f"({type(e).__name__}: {e})") from None
        self._cache[key] = block
        self._cached_bytes += block.nbytes
        while self._cached_bytes > CHUNK_CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return block

    def close(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0
