"""Stain normalisation and stain augmentation of H&E patches, applied to the ``uint8`` crops before the
encoder (:class:`gnnst.data.patches.PatchStream` calls a plan's ``transform``).

A slide's stain is estimated ONCE, on a sample of its own patches' pixels (:func:`sample_pixels`,
:func:`estimate`): per-patch estimation is unstable on 100-200 µm patches with little tissue, and would
erase the real colour differences between patches of a slide (how much haematoxylin a patch holds is
biology). Every patch of the slide is then mapped from the slide's stain to a reference
(:class:`StainNormalizer`); the reference is estimated the same way on the pooled pixels of the
training slides (per fold in cross-validation, all slides for the final model) and travels in the
:class:`~gnnst.predictor.TrainedModel`, so ``gnnst predict`` maps a new slide to the same one. Only the
slide's own pixels are read; never its expression.

- ``macenko`` (Macenko et al., ISBI 2009): optical density (OD) of tissue pixels, the two stain vectors
  at the 1st/99th percentile angles in the plane of the two largest OD eigenvectors, concentrations by
  least squares, scaled so that their 99th percentiles match the reference's, re-coloured with the
  reference's stain vectors.
- ``reinhard`` (Reinhard et al. 2001): per LAB channel, the slide's tissue mean and sd mapped to the
  reference's.
- :class:`HEDJitter` (Tellez et al. 2018), training only: each stain's concentration in the
  haematoxylin-eosin-DAB colour deconvolution (Ruifrok and Johnston 2001) scaled by ``alpha`` and shifted
  by ``beta``.

Written here in numpy (+ scikit-image's LAB conversion) rather than taken from ``torchstain`` /
``torch-staintools``: both estimate the source stain on each image they normalise, and expose no way
to normalise a patch with the stain estimated on its whole slide.

Every transform has an ``identity`` (a digest of everything that changes its output), which enters the
embedding cache key (:func:`gnnst.data.embeddings.cache_key`): nothing is re-encoded by accident and no
stale embedding is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData

    from gnnst.data.images import SlideImage

STAIN_METHODS = ("macenko", "reinhard")
IO = 240.0  # transmitted light intensity (Macenko's I_0): a pixel of this grey level has OD 0
OD_TISSUE = 0.15  # a pixel is tissue when its OD is at least this in every channel (Macenko's beta)
ANGLE_PERCENTILE = 1.0  # Macenko's alpha: the stain vectors at the 1st and 99th percentile angles
MAX_C_PERCENTILE = 99.0  # the concentration taken as a stain's maximum
MIN_TISSUE_PIXELS = 100  # fewer tissue pixels than this cannot estimate a stain
SAMPLE_SIDE = 32  # a sampled crop contributes at most SAMPLE_SIDE x SAMPLE_SIDE pixels (strided)
# most pixels a fold's reference stain is estimated on: each training slide gives at most its share (a seeded
# uniform subsample of its sampled pixels), so a cohort's reference is bounded (her2st-6: 5 x ~350,000, all kept)
REFERENCE_PIXELS = 4_000_000


class TooLittleTissue(GnnstError):
    """Too few tissue pixels to estimate a stain (:data:`MIN_TISSUE_PIXELS`)."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


_OD = -np.log((np.arange(256, dtype=np.float64) + 1.0) / IO)  # the optical density of each uint8 level


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-log((I + 1) / IO)`` of ``uint8`` RGB ``[..., 3]`` (float64, same shape; looked up)."""
    return _OD[np.asarray(rgb, dtype=np.uint8)]


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, clipped to ``uint8``."""
    v = np.exp(-od)
    v *= IO
    v -= 1.0
    np.clip(v, 0, 255, out=v)
    return np.rint(v, out=v).astype(np.uint8)  # in place: the values of clip(IO * exp(-od) - 1).round()


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """``[P]`` bool: pixels of ``rgb`` ``[P, 3]`` whose OD is at least :data:`OD_TISSUE` in every channel."""
    return np.all(rgb_to_od(rgb) >= OD_TISSUE, axis=-1)


@dataclass(frozen=True)
class StainStats:
    """A stain estimated on pixels (a slide's, or the pooled training slides' for a reference).

    Attributes:
        method: ``macenko`` or ``reinhard``.
        a, b: ``macenko``: stain vectors ``[3, 2]`` (OD per RGB channel; haematoxylin first) and maximal
            concentrations ``[2]``; ``reinhard``: LAB mean ``[3]`` and sd ``[3]`` of the tissue pixels.
        n_pixels: tissue pixels it was estimated on.
    """

    method: str
    a: np.ndarray
    b: np.ndarray
    n_pixels: int

    def to_dict(self) -> dict:
        return {"method": self.method, "a": np.asarray(self.a).tolist(), "b": np.asarray(self.b).tolist(),
                "n_pixels": int(self.n_pixels)}

    @classmethod
    def from_dict(cls, d: dict) -> "StainStats":
        if d.get("method") not in STAIN_METHODS:
            raise GnnstError(f"stain statistics of unknown method {d.get('method')!r} (known: {', '.join(STAIN_METHODS)})")
        return cls(method=str(d["method"]), a=np.asarray(d["a"], dtype=np.float64),
                   b=np.asarray(d["b"], dtype=np.float64), n_pixels=int(d["n_pixels"]))

    @property
    def identity(self) -> str:
        """Digest of the statistics (rounded to 6 significant digits, so it survives a JSON round trip)."""
        return _digest({"method": self.method, "a": [float(f"{v:.6g}") for v in np.ravel(self.a)],
                        "b": [float(f"{v:.6g}") for v in np.ravel(self.b)]})


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(rgb.astype(np.float64) / 255.0)


def estimate(method: str, rgb: np.ndarray, *, where: str = "pixels") -> StainStats:
    """The stain of ``rgb`` ``[P, 3]`` uint8 pixels (see the module docstring); ``where`` names them in
    errors (too few tissue pixels)."""
    if method not in STAIN_METHODS:
        raise GnnstError(f"unknown stain normalisation {method!r} (known: {', '.join(STAIN_METHODS)})")
    rgb = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    tissue = rgb[tissue_mask(rgb)]
    if len(tissue) < MIN_TISSUE_PIXELS:
        raise TooLittleTissue(f"{where}: {len(tissue)} tissue pixels (OD >= {OD_TISSUE} in every channel) of "
                         f"{len(rgb)}, fewer than {MIN_TISSUE_PIXELS}: its stain cannot be estimated "
                         f"(features.stain_norm={method})")
    if method == "reinhard":
        lab = _lab(tissue)
        return StainStats(method, lab.mean(0), np.maximum(lab.std(0), 1e-3), len(tissue))
    od = rgb_to_od(tissue)  # [P, 3]
    _, vecs = np.linalg.eigh(np.cov(od.T))  # ascending eigenvalues
    plane = vecs[:, 1:3]  # [3, 2]
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)  # haematoxylin (more red OD) first
    he *= np.sign(he.sum(0, keepdims=True))  # OD vectors point into the positive octant
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]  # [2, P]
    max_c = np.maximum(np.percentile(conc, MAX_C_PERCENTILE, axis=1), 1e-6)
    return StainStats(method, he, max_c, len(tissue))


class StainNormalizer:
    """Maps crops of one slide from its stain (``source``) to ``target`` (picklable: it crosses to the
    patch workers).

    Shapes: ``[..., 3]`` uint8 -> the same shape, uint8.
    """

    def __init__(self, source: StainStats, target: StainStats):
        if source.method != target.method:
            raise GnnstError(f"stain statistics of '{source.method}' cannot be mapped to a '{target.method}' reference")
        self.source, self.target = source, target
        if source.method == "macenko":
            # OD -> concentrations (least squares: the pseudo-inverse of the source's stain vectors), scaled
            # to the reference's maxima, re-coloured with its vectors: one [3, 3] map of the OD
            scale = np.diag(np.asarray(target.b, dtype=np.float64) / np.asarray(source.b, dtype=np.float64))
            self._od_map = (np.asarray(target.a, dtype=np.float64) @ scale @ np.linalg.pinv(source.a)).T

    @property
    def identity(self) -> str:
        return f"{self.target.method}:{self.source.identity}>{self.target.identity}"

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        shape = crops.shape
        rgb = crops.reshape(-1, 3)
        if self.source.method == "reinhard":
            from skimage.color import lab2rgb

            lab = (_lab(rgb) - self.source.a) / self.source.b * self.target.b + self.target.a
            return np.clip(lab2rgb(lab) * 255.0, 0, 255).round().astype(np.uint8).reshape(shape)
        return od_to_rgb(rgb_to_od(rgb) @ self._od_map).reshape(shape)


class HEDJitter:
    """HED colour augmentation: in the haematoxylin-eosin-DAB deconvolution of the OD (scikit-image's
    ``hed_from_rgb``), each stain's concentration ``c -> c * alpha + beta``; applied after ``before``
    (a slide's :class:`StainNormalizer`, when stain normalisation is on).

    Shapes: ``[..., 3]`` uint8 -> the same shape, uint8.
    """

    def __init__(self, alpha: Sequence[float], beta: Sequence[float], before: StainNormalizer | None = None):
        self.alpha = np.asarray(alpha, dtype=np.float64)
        self.beta = np.asarray(beta, dtype=np.float64)
        self.before = before

    @classmethod
    def draw(cls, sigma: float, bias: float, seed: Sequence[int | str], before: StainNormalizer | None = None
             ) -> "HEDJitter":
        """``alpha ~ U(1 - sigma, 1 + sigma)``, ``beta ~ U(-bias, bias)`` per stain, from a generator seeded by
        ``seed`` (e.g. ``(run seed, slide id, view)``), so a view is the same in every process and fold."""
        rng = np.random.default_rng(int(_digest([str(s) for s in seed]), 16))
        return cls(rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-bias, bias, 3), before)

    @property
    def identity(self) -> str:
        own = "hed:" + _digest({"alpha": [f"{v:.9g}" for v in self.alpha], "beta": [f"{v:.9g}" for v in self.beta]})
        return own if self.before is None else f"{self.before.identity}|{own}"

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        from skimage.color import hed_from_rgb, rgb_from_hed

        if self.before is not None:
            crops = self.before(crops)
        shape = crops.shape
        hed = rgb_to_od(crops.reshape(-1, 3)) @ hed_from_rgb  # [P, 3]
        return od_to_rgb((hed * self.alpha + self.beta) @ rgb_from_hed).reshape(shape)


def sample_pixels(adata: "AnnData", *, size_um: float, n_spots: int, pad_value: int = 255,
                  image: "SlideImage | None" = None) -> np.ndarray:
    """Pixels ``[P, 3]`` uint8 of the patches around up to ``n_spots`` evenly spaced spots of a slide (its
    own image, cut as the encoder's patches are; each crop strided to at most :data:`SAMPLE_SIDE` px a side).

    ``image``: the slide already opened (else opened and closed here).
    """
    from gnnst import keys
    from gnnst.data.images import open_image, probe_image
    from gnnst.data.patches import PatchPlan, cached_crops, patch_side_px, read_crops
    from gnnst.data.validate import image_coordinates

    xy, mpp = image_coordinates(adata)
    pick = np.unique(np.linspace(0, len(xy) - 1, min(n_spots, len(xy))).round().astype(int))
    path = adata.uns[keys.UNS_GNNST][keys.IMAGE_PATH]
    side = patch_side_px(size_um, mpp)
    downsamples = image.level_downsamples if image is not None else probe_image(path)[2]
    every = PatchPlan.make("", path, xy, side_px=side, out_size=min(side, 224), downsamples=downsamples,
                           pad_value=pad_value)
    # a whole-image file is decoded whole anyway: all its spots' crops are cut and kept (patches.CROPS), so
    # the fold's normalised patches are cut from them without decoding the image again
    crops = cached_crops(every, image=image)  # [N, r, r, 3], or None (a pyramid, or over the budget)
    if crops is not None:
        crops = crops[pick]
    else:
        im = image or open_image(path, pad_value=pad_value)
        try:
            crops = read_crops(im, dataclasses.replace(every, xy=every.xy[pick]), slice(None))  # [S, r, r, 3]
        finally:
            if image is None:
                im.close()
    step = max(crops.shape[1] // SAMPLE_SIDE, 1)
    return np.ascontiguousarray(crops[:, ::step, ::step]).reshape(-1, 3)
