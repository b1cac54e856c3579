"""Image access: openslide for whole-slide formats, Pillow for plain JPEG/PNG, zarr for an OME-Zarr
image folder (a SpatialData image element, :mod:`gnnst.data.zarr_image`).

``open_image(path)`` returns a :class:`SlideImage` whose ``read_region`` is the one call the rest of
gnnst uses; regions reaching past the image border are padded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gnnst.errors import GnnstError

PIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}  # decoded whole with Pillow
WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".svslide", ".bif"}


class SlideImage:
    """A full-resolution image, read by region.

    Args:
        path: the image file.
        pad_value: grey level used for the part of a region outside the image.

    Attributes:
        width, height: full-resolution size in pixels.
        mpp: micrometres per pixel from the file's metadata, or ``None``.
    """

    def __init__(self, path: str | Path, *, pad_value: int = 255):
        self.path = Path(path)
        self.pad_value = pad_value
        self.mpp: float | None = None
        self._pil = None  # decoded PIL.Image in RGB (Pillow backend); regions are cropped from it
        self._slide = None  # openslide.OpenSlide (WSI backend)
        if self.path.is_dir():  # an OME-Zarr image group (SpatialData image element); no mpp in it
            from gnnst.data.zarr_image import ZarrPyramid

            self._slide = ZarrPyramid(self.path)
            self.width, self.height = self._slide.dimensions
            return
        if not self.path.is_file():
            raise GnnstError(f"image file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix in PIL_SUFFIXES:
            self._open_pil()
        elif suffix in WSI_SUFFIXES:
            self._open_openslide()
        else:
            raise GnnstError(f"{self.path}: unsupported image format '{suffix}' "
                             f"(known: {', '.join(sorted(PIL_SUFFIXES | WSI_SUFFIXES))})")

    @classmethod
    def from_array(cls, rgb: np.ndarray, *, name: str = "<array>", pad_value: int = 255) -> "SlideImage":
        """An image held in memory, ``[h, w, 3]`` (or ``[h, w, 4]``, alpha dropped): uint8, or floats in
        [0, 1] as scanpy keeps ``uns['spatial'][lib]['images']``; ``name`` stands for its path in messages."""
        from PIL import Image

        a = np.asarray(rgb)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise GnnstError(f"{name}: an image must be [h, w, 3] RGB, got shape {list(a.shape)}")
        if a.dtype.kind == "f":
            a = (np.clip(a, 0.0, 1.0) * 255.0).round()
        self = cls.__new__(cls)
        self.path, self.pad_value, self.mpp, self._slide = Path(name), pad_value, None, None
        self._pil = Image.fromarray(np.ascontiguousarray(a[..., :3], dtype=np.uint8))
        self.width, self.height = self._pil.size
        return self

    def _open_pil(self) -> None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # her2st JPEGs are ~92 megapixels
        try:
            im = Image.open(self.path)
            im.load()
            self._pil = im if im.mode == "RGB" else im.convert("RGB")  # no copy when already RGB
        except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError for corrupt files
            raise GnnstError(f"{self.path}: cannot decode image ({type(e).__name__}: {e})") from None
        self.width, self.height = self._pil.size

    def _open_openslide(self) -> None:
        try:
            import openslide
        except ImportError as e:  # pragma: no cover - declared dependency
            raise GnnstError(f"{self.path}: reading whole-slide images needs openslide-python ({e})") from None
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as e:
            raise GnnstError(f"{self.path}: cannot open as a whole-slide image ({type(e).__name__}: {e})") from None
        self.width, self.height = self._slide.dimensions
        props = self._slide.properties
        try:
            mx, my = float(props.get("openslide.mpp-x", "nan")), float(props.get("openslide.mpp-y", "nan"))
        except ValueError:
            mx = my = float("nan")
        if np.isfinite(mx) and mx > 0:
            self.mpp = float((mx + my) / 2 if np.isfinite(my) and my > 0 else mx)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of each pyramid level (``(1.0,)`` for a plain image)."""
        return tuple(self._slide.level_downsamples) if self._slide is not None else (1.0,)

    def read_region(self, x0: int, y0: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """RGB region ``[h, w, 3]`` uint8 with top-left ``(x0, y0)`` in level-0 pixels.

        ``w, h`` are in pixels of ``level``. Parts outside the image are ``pad_value``.
        """
        if self._pil is not None:
            if level != 0:
                raise GnnstError(f"{self.path}: a plain image has only level 0, asked for level {level}")
            xa, ya = max(x0, 0), max(y0, 0)
            xb, yb = min(x0 + w, self.width), min(y0 + h, self.height)
            if xa == x0 and ya == y0 and xb == x0 + w and yb == y0 + h:
                return np.asarray(self._pil.crop((x0, y0, x0 + w, y0 + h)))
            out = np.full((h, w, 3), self.pad_value, dtype=np.uint8)  # part of the region is off the image
            if xb > xa and yb > ya:
                out[ya - y0:yb - y0, xa - x0:xb - x0] = np.asarray(self._pil.crop((xa, ya, xb, yb)))
            return out
        rgba = np.asarray(self._slide.read_region((int(x0), int(y0)), level, (int(w), int(h))))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0  # transparent outside the slide
        rgb = rgba[..., :3].astype(np.float32) * alpha + self.pad_value * (1.0 - alpha)
        return rgb.round().astype(np.uint8)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """Downsampled RGB image ``[h, w, 3]`` uint8 whose longer side is at most ``max_side``."""
        from PIL import Image

        if self._slide is not None:
            return self._tiled_thumbnail(max_side)
        im = self._pil.copy()
        im.thumbnail((max_side, max_side))
        return np.asarray(im)

    def _tiled_thumbnail(self, max_side: int, tile: int = 2048) -> np.ndarray:
        """Thumbnail assembled tile by tile from the best pyramid level.

        Memory stays at one ``tile`` x ``tile`` region plus the result even when the slide has no
        low-resolution level (openslide's ``get_thumbnail`` reads that level whole).
        """
        from PIL import Image

        scale = min(max_side / max(self.width, self.height), 1.0)
        tw, th = max(int(self.width * scale), 1), max(int(self.height * scale), 1)
        level = self._slide.get_best_level_for_downsample(1.0 / scale)
        ds = self._slide.level_downsamples[level]
        lw, lh = self._slide.level_dimensions[level]
        out = Image.new("RGB", (tw, th), (self.pad_value,) * 3)
        for ly in range(0, lh, tile):
            for lx in range(0, lw, tile):
                w, h = min(tile, lw - lx), min(tile, lh - ly)
                x0, y0 = round(lx * tw / lw), round(ly * th / lh)
                x1, y1 = round((lx + w) * tw / lw), round((ly + h) * th / lh)
                if x1 > x0 and y1 > y0:
                    region = self.read_region(int(lx * ds), int(ly * ds), w, h, level=level)  # [h, w, 3]
                    out.paste(Image.fromarray(region).resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
        return np.asarray(out)

    def close(self) -> None:
        """Release the file and the decoded pixels; closing twice is harmless."""
        if self._slide is not None:
            self._slide.close()
        if self._pil is not None:
            self._pil.close()
        self._pil = self._slide = None

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideImage('{self.path.name}', {self.width}x{self.height}, mpp={self.mpp})"


def open_image(path: str | Path, *, pad_value: int = 255) -> SlideImage:
    """Open ``path`` with the backend its format needs (a folder: an OME-Zarr image group)."""
    return SlideImage(path, pad_value=pad_value)


def probe_image(path: str | Path) -> tuple[int, int, tuple[float, ...]]:
    """``(width, height, level_downsamples)`` of an image without decoding its pixels (a JPEG's header,
    a whole-slide image's metadata): cheap enough to check every slide before any work starts."""
    path = Path(path)
    if not path.is_file():
        raise GnnstError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as im:  # reads the header only
                return int(im.size[0]), int(im.size[1]), (1.0,)
        except Exception as e:
            raise GnnstError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    with SlideImage(path) as im:  # openslide reads metadata only when opening
        return im.width, im.height, im.level_downsamples
