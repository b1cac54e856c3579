"""What the model sees of a slide: its patch embeddings after the slide-shift corrections of the
``features`` config (:class:`gnnst.config.FeaturesConfig`), the same for training, held-out and new slides.

Two steps, each reading only the slide's own images (never its expression):

1. stain normalisation of the patches before the encoder (``features.stain_norm``,
   :mod:`gnnst.data.stain`): the slide's stain estimated on its own pixels, mapped to a reference estimated
   on the training slides' pixels (:func:`fold_features`; the reference is kept in :class:`FeatureState`);
2. per-slide standardisation of the embeddings (``features.slide_norm``, :class:`SlideNorm`): each dimension
   minus the slide's own mean, over its own sd; a slide of fewer than ``features.min_spots`` spots gets the
   training slides' statistics instead, with a warning.

Training only (``features.stain_augment``): ``V - 1`` HED-jittered embeddings per spot of each training
slide, cached like every embedding and kept as ``x_views`` ``[V, N, D]`` beside ``x`` (view 0 = ``x``),
each view standardised by its own statistics; the trainer draws one view per spot per epoch
(:mod:`gnnst.train.views`). Nothing of it is recorded for prediction.

:class:`FeatureState` is what a :class:`~gnnst.predictor.TrainedModel` records of this (which
normalisations, the stain reference, the training statistics), and :meth:`FeatureState.inputs` is the
one function that turns a slide graph's ``x`` into the model's input.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from torch_geometric.data import Data

    from gnnst.config import Config, FeaturesConfig
    from gnnst.data.stain import StainNormalizer, StainStats

log = logging.getLogger("gnnst")

SD_FLOOR = 1e-3  # an embedding dimension's sd is at least this (a constant dimension stays 0, not inf)


@dataclass
class SlideNorm:
    """Per-slide standardisation of patch embeddings (``features.slide_norm: standardize``).

    Attributes:
        min_spots: fewest spots whose own statistics are used.
        mean, std: ``[D]`` float32, the training spots' statistics (pooled over the training slides), the
            fallback for a slide of fewer than ``min_spots`` spots.
    """

    min_spots: int
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, xs: Iterable[np.ndarray], min_spots: int) -> "SlideNorm":
        """From the training slides' embeddings (each ``[N_i, D]``), read one at a time: float64 mean and sum
        of squared deviations per slide, pooled exactly (Chan et al.), so a cohort's ``x`` is never held at
        once; equal to the statistics of the slides concatenated up to float64 rounding."""
        n, mean, m2 = 0, None, None
        for v in xs:
            v = np.asarray(v, dtype=np.float64)
            if not len(v):
                continue
            mu = v.mean(0)
            sq = ((v - mu) ** 2).sum(0)
            if mean is None:
                n, mean, m2 = len(v), mu, sq
                continue
            total = n + len(v)
            delta = mu - mean
            mean = mean + delta * (len(v) / total)
            m2 = m2 + sq + delta**2 * (n * len(v) / total)
            n = total
        if mean is None:
            raise ValueError("SlideNorm.fit: no training spots")
        return cls(min_spots=int(min_spots), mean=mean.astype(np.float32),
                   std=np.maximum(np.sqrt(m2 / n), SD_FLOOR).astype(np.float32))

    def apply(self, x: np.ndarray, *, slide: str = "slide", warn: bool = True) -> np.ndarray:
        """``x`` ``[N, D]`` standardised per dimension by its own statistics (by the training ones when
        ``N < min_spots``, with a warning naming ``slide``); float32."""
        x = np.asarray(x, dtype=np.float32)
        if len(x) >= self.min_spots:
            mean, std = x.mean(0, dtype=np.float64), np.maximum(x.std(0, dtype=np.float64), SD_FLOOR)
        else:
            if warn:
                log.warning("%s: %d spots, fewer than features.min_spots=%d: its embeddings are standardised with "
                            "the training slides' statistics, not its own", slide, len(x), self.min_spots)
            mean, std = self.mean, self.std
        return ((x - mean) / std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"min_spots": self.min_spots, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "SlideNorm":
        return cls(min_spots=int(d["min_spots"]), mean=np.asarray(d["mean"], dtype=np.float32),
                   std=np.asarray(d["std"], dtype=np.float32))


@dataclass
class FeatureState:
    """The feature normalisation a model was trained with and that prediction applies.

    Attributes:
        slide_norm: :class:`SlideNorm` (``standardize``) or ``None`` (``none``).
        stain_norm: ``none``, ``macenko`` or ``reinhard``.
        stain_reference: the reference stain (estimated on the training slides' pixels) when ``stain_norm``
            is not ``none``.
        stain_sample_spots: spots per slide whose patches estimate its stain.
    """

    slide_norm: SlideNorm | None = None
    stain_norm: str = "none"
    stain_reference: "StainStats | None" = None
    stain_sample_spots: int = 256

    def describe(self) -> str:
        return f"slide_norm={'standardize' if self.slide_norm else 'none'}, stain_norm={self.stain_norm}"

    def to_dict(self) -> dict:
        return {"slide_norm": None if self.slide_norm is None else self.slide_norm.to_dict(),
                "stain_norm": self.stain_norm,
                "stain_reference": None if self.stain_reference is None else self.stain_reference.to_dict(),
                "stain_sample_spots": int(self.stain_sample_spots)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeatureState":
        """Inverse of :meth:`to_dict`; ``None`` (a model file from before issue 15) = no normalisation."""
        from gnnst.data.stain import StainStats

        if d is None:
            return cls()
        st = cls(slide_norm=None if d.get("slide_norm") is None else SlideNorm.from_dict(d["slide_norm"]),
                 stain_norm=str(d.get("stain_norm", "none")),
                 stain_reference=None if d.get("stain_reference") is None else StainStats.from_dict(d["stain_reference"]),
                 stain_sample_spots=int(d.get("stain_sample_spots", 256)))
        st.check()
        return st

    def check(self) -> None:
        if (self.stain_norm == "none") != (self.stain_reference is None):
            raise GnnstError(f"features: stain_norm '{self.stain_norm}' and its stain reference disagree")
        if self.stain_reference is not None and self.stain_reference.method != self.stain_norm:
            raise GnnstError(f"features: stain_norm '{self.stain_norm}' with a '{self.stain_reference.method}' reference")

    # ------------------------------------------------------------------ the model's input
    def inputs(self, x, *, slide: str = "slide", warn: bool = True) -> np.ndarray:
        """The model's input ``[N, D]`` float32 for a slide's embeddings ``x`` ``[N, D]`` (array or tensor;
        already stain-normalised when :attr:`stain_norm` is on, :meth:`stain_transform`)."""
        x = x.float().cpu().numpy() if hasattr(x, "cpu") else np.asarray(x, dtype=np.float32)
        return x if self.slide_norm is None else self.slide_norm.apply(x, slide=slide, warn=warn)

    def graph_inputs(self, g: "Data", *, warn: bool = True, hold=None) -> "Data":
        """A shallow copy of ``g`` whose ``x`` (and ``x_views``, each view on its own) is the model's input,
        in ``g.x``'s dtype; ``g`` itself is unchanged. ``hold``: array -> tensor of the same values where the
        new arrays are kept (e.g. :meth:`gnnst.graph.targets.TargetFolder.hold`: file-backed, so a cohort's
        standardised ``x`` is not in RAM); default in memory."""
        import torch

        d = copy.copy(g)
        if self.slide_norm is None:
            return d
        keep = hold or torch.from_numpy
        slide = f"slide '{getattr(g, keys.DATA_SLIDE, None) or 'slide'}'"
        dt = g.x.dtype
        x = torch.from_numpy(self.inputs(g.x, slide=slide, warn=warn)).to(dt)
        views = getattr(g, keys.DATA_X_VIEWS, None)
        if views is not None:
            x = torch.stack([x] + [torch.from_numpy(self.inputs(v, slide=slide, warn=False)).to(dt) for v in views[1:]])
            setattr(d, keys.DATA_X_VIEWS, keep(x.numpy()))
            d.x = getattr(d, keys.DATA_X_VIEWS)[0]
        else:
            d.x = keep(x.numpy())
        return d

    def stain_transform(self, adata: "AnnData", *, size_um: float, pad_value: int = 255, image=None,
                        cache_dir: Path | None = None, image_id: str | None = None) -> "StainNormalizer | None":
        """The map of ``adata``'s slide (its own pixels) to :attr:`stain_reference`, or ``None`` when stain
        normalisation is off, or when the slide's sampled patches hold too little tissue to estimate its
        stain (its patches then keep their colours, with a warning naming the slide). ``cache_dir``,
        ``image_id``: see :func:`slide_pixels`."""
        if self.stain_norm == "none":
            return None
        from gnnst.data.stain import StainNormalizer, TooLittleTissue

        try:
            own = slide_stain(adata, self.stain_norm, size_um=size_um, n_spots=self.stain_sample_spots,
                              pad_value=pad_value, image=image, cache_dir=cache_dir, image_id=image_id)
        except TooLittleTissue as e:
            log.warning("%s; its patches are not stain-normalised", e)
            return None
        return StainNormalizer(own, self.stain_reference)


# ---------------------------------------------------------------------------------------- per fold
PIXEL_CACHE_BYTES = 256 << 20  # sampled pixels kept per process (her2st-6: 6 x ~1 MB)
PIXEL_SAMPLE_VERSION = "1"  # in the key of sampled pixels cached on disk: change it when sample_pixels changes
_PIXELS = None  # this process's CropCache of them: _pixel_cache()
_ENCODERS: dict = {}  # per process: the encoder that re-embeds transformed patches


def _pixel_cache():
    """This process's sampled pixels of slides, (image, spots, patch) -> ``[P, 3]``, kept up to
    :data:`PIXEL_CACHE_BYTES` (least recently used out first): a fold's reference and a slide's own stain
    read the same pixels, and the next fold's too."""
    global _PIXELS
    if _PIXELS is None:
        from gnnst.data.patches import CropCache

        _PIXELS = CropCache(PIXEL_CACHE_BYTES)
    return _PIXELS


def _slide_name(adata: "AnnData") -> str:
    return str(adata.obs[keys.SLIDE_ID].iloc[0])


def slide_pixels(adata: "AnnData", *, size_um: float, n_spots: int, pad_value: int = 255, image=None,
                 cache_dir: Path | None = None, image_id: str | None = None) -> np.ndarray:
    """:func:`gnnst.data.stain.sample_pixels` of a slide ``[P, 3]`` uint8, kept per process (:func:`_pixel_cache`)
    and, with ``cache_dir``, in a file there (keyed by the image's identity ``image_id``, by default its
    path, size and time, the spots and the sampling), so a later run estimates the slide's stain without
    decoding its image; a damaged file is sampled again."""
    from gnnst.data.stain import sample_pixels

    key = (adata.uns[keys.UNS_GNNST][keys.IMAGE_PATH], _slide_name(adata), adata.n_obs,
           float(np.asarray(adata.obsm[keys.SPATIAL]).sum()), float(size_um), int(n_spots), int(pad_value))
    cache = _pixel_cache()
    px = cache.get(key)
    if px is not None:
        return px
    path = None if cache_dir is None else _pixel_path(adata, Path(cache_dir), size_um, n_spots, pad_value, image_id)
    px = _read_pixels(path)
    if px is None:
        px = sample_pixels(adata, size_um=size_um, n_spots=n_spots, pad_value=pad_value, image=image)
        if path is not None:
            from gnnst.io import atomic_path

            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, px)
    cache.put(key, px)
    return px


def _pixel_path(adata: "AnnData", cache_dir: Path, size_um: float, n_spots: int, pad_value: int,
                image_id: str | None) -> Path:
    """The file of a slide's sampled pixels under ``cache_dir``: a digest of the image's identity, the spots
    (as the embedding cache keys them: :func:`gnnst.data.embeddings.cache_key`) and the sampling."""
    from gnnst.data.embeddings import cache_key, default_image_id
    from gnnst.data.stain import SAMPLE_SIDE

    sampling = f"stain-pixels:{PIXEL_SAMPLE_VERSION}:{int(n_spots)}:{int(pad_value)}:{SAMPLE_SIDE}"
    key = cache_key(adata, encoder_identity=sampling, input_size=0, size_um=float(size_um),
                    image_id=image_id or default_image_id(adata))
    return cache_dir / f"{_slide_name(adata)}-{key}.npy"


def _read_pixels(path: Path | None) -> np.ndarray | None:
    """Sampled pixels ``[P, 3]`` uint8 from ``path``, or ``None`` when absent or not such an array."""
    if path is None or not path.is_file():
        return None
    try:
        px = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return px if px.dtype == np.uint8 and px.ndim == 2 and px.shape[1] == 3 else None


def slide_stain(adata: "AnnData", method: str, *, size_um: float, n_spots: int, pad_value: int = 255,
                image=None, cache_dir: Path | None = None, image_id: str | None = None) -> "StainStats":
    """The stain of one slide, estimated on its own pixels (``cache_dir``, ``image_id``: :func:`slide_pixels`)."""
    from gnnst.data.stain import estimate

    px = slide_pixels(adata, size_um=size_um, n_spots=n_spots, pad_value=pad_value, image=image,
                      cache_dir=cache_dir, image_id=image_id)
    return estimate(method, px, where=f"slide '{_slide_name(adata)}'")


def stain_reference(adatas: Sequence["AnnData"], method: str, *, size_um: float, n_spots: int,
                    pad_value: int = 255, cache_dir: Path | None = None,
                    image_ids: Sequence[str | None] | None = None) -> "StainStats":
    """The reference stain: estimated on the pooled pixels of ``adatas`` (the training slides), read one
    slide at a time; each slide gives at most ``REFERENCE_PIXELS / len(adatas)`` of its sampled pixels
    (:data:`gnnst.data.stain.REFERENCE_PIXELS`; above that a uniform subsample seeded by the slide's id), so
    the estimate holds a bounded sample of a cohort, not every slide's. ``cache_dir``, ``image_ids`` (one per
    slide): see :func:`slide_pixels`."""
    import zlib

    from gnnst.data.stain import REFERENCE_PIXELS, estimate

    share = max(REFERENCE_PIXELS // max(len(adatas), 1), 1)
    parts = []
    for a, image_id in zip(adatas, image_ids or [None] * len(adatas), strict=True):
        px = slide_pixels(a, size_um=size_um, n_spots=n_spots, pad_value=pad_value, cache_dir=cache_dir,
                          image_id=image_id)
        if len(px) > share:
            rng = np.random.default_rng(zlib.crc32(_slide_name(a).encode()))
            px = px[np.sort(rng.choice(len(px), share, replace=False))]
        parts.append(px)
    names = ", ".join(_slide_name(a) for a in adatas[:10]) + (f" and {len(adatas) - 10} more" if len(adatas) > 10 else "")
    return estimate(method, np.concatenate(parts), where=f"training slides {names}")


class LazyEmbeddings(Mapping):
    """Slide id -> its embeddings ``[N, D]`` float32, read each time a slide is looked up (from the embedding
    cache, or the slide source's memory-mapped graphs), so a cohort's are never all in memory at once."""

    def __init__(self, readers: dict):
        self._readers = dict(readers)  # slide id -> () -> [N, D]

    def __getitem__(self, slide_id: str) -> np.ndarray:
        return self._readers[slide_id]()

    def __contains__(self, slide_id) -> bool:  # Mapping's would read the slide to answer
        return slide_id in self._readers

    def __iter__(self):
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


@dataclass
class FoldFeatures:
    """A fit's embeddings before :class:`SlideNorm` (see :func:`fold_features`).

    Attributes:
        embs: slide id -> ``[N, D]`` (stain-normalised to the fold's reference when on), a
            :class:`LazyEmbeddings`: each lookup reads the slide again.
        views: training slide id -> ``[V, N, D]`` (view 0 = ``embs``) when ``features.stain_augment`` > 0, a
            :class:`LazyEmbeddings`: each lookup reads the slide's views from the embedding cache.
        stain_reference: the fold's reference stain, or ``None``.
    """

    embs: Mapping
    views: Mapping = field(default_factory=dict)
    stain_reference: "StainStats | None" = None


def _embed(cfg: "Config", images: Sequence["AnnData"], image_ids: Sequence[str | None], transforms: Sequence,
           size_um: float, keep: bool = True) -> list:
    """Embeddings of the slides ``images`` (:meth:`~gnnst.graph.store.SlideSource.image_slide`, named in the
    cache by ``image_ids``) with their patches transformed, from the cache or the encoder (built once per
    process, on ``encoder.device``, the first time a fit needs it). ``keep=False``: each slide's
    :class:`~gnnst.data.embeddings.CachedEmbeddings` instead of its array (see ``embed_slides``)."""
    from gnnst.data.embeddings import embed_slides
    from gnnst.data.encoders import default_batch_size, default_num_workers, resolve_device
    from gnnst.data.manifest import cache_root
    from gnnst.graph.dataset import _load_encoder

    cache_dir = cache_root(cfg.data.cache_dir) / "embeddings"
    enc_cfg = cfg.encoder
    key = (enc_cfg.name, enc_cfg.checkpoint, repr(enc_cfg.timm_kwargs), enc_cfg.device, enc_cfg.precision)
    device = resolve_device(enc_cfg.device)
    batch_size = enc_cfg.batch_size or default_batch_size(device)
    if key not in _ENCODERS:  # built once per process (embed_slides reads the cache first)
        _ENCODERS.clear()
        _ENCODERS[key] = _load_encoder(cfg, device, batch_size)[0]
    encoder = _ENCODERS[key]
    return embed_slides(list(images), encoder, size_um=size_um,
                        batch_size=batch_size,
                        num_workers=enc_cfg.num_workers if enc_cfg.num_workers is not None else
                        default_num_workers(device), pad_value=cfg.patch.pad_value, device=device,
                        cache_dir=cache_dir, image_ids=image_ids, transforms=transforms, progress=False,
                        cache_crops=True, keep=keep)  # every fold cuts the same slides: decoded once per process


def fold_features(cfg: "Config", source, train_slides: Sequence[str], slides: Sequence[str]) -> FoldFeatures:
    """The embeddings of ``slides`` for a fit on ``train_slides`` (:class:`FoldFeatures`): the encoder's own
    (``source.embs``; ``source`` a :class:`~gnnst.graph.store.SlideSource`: slides in memory or a graph
    folder) or, with ``features.stain_norm``, those of patches mapped to the reference of the training
    slides' pixels; with ``features.stain_augment``, the training slides' augmented views. Everything is
    cached; only the slides' images are read (:meth:`~gnnst.graph.store.SlideSource.image_slide`)."""
    from gnnst.data.encoders import default_patch_um
    from gnnst.data.manifest import cache_root

    fc = cfg.features
    size = cfg.patch.size_um if cfg.patch.size_um is not None else default_patch_um(cfg.encoder.name)
    n_spots, pad = fc.stain_sample_spots, cfg.patch.pad_value
    slides, train_slides = list(slides), list(train_slides)
    ref, normalizers = None, {s: None for s in slides}
    embs = LazyEmbeddings({s: functools.partial(source.embs.__getitem__, s) for s in slides})
    if fc.stain_norm != "none" or fc.stain_augment > 0:
        images = {s: source.image_slide(s) for s in slides}  # checks every image is at hand, before any work
        ids = {s: source.image_id(s) for s in slides}  # the same image identity as the build's cache
    if fc.stain_norm != "none":
        pixels = cache_root(cfg.data.cache_dir) / "stain_pixels"  # a warm run decodes no image for its stains
        ref = stain_reference([images[s] for s in train_slides], fc.stain_norm, size_um=size, n_spots=n_spots,
                              pad_value=pad, cache_dir=pixels, image_ids=[ids[s] for s in train_slides])
        state = FeatureState(stain_norm=fc.stain_norm, stain_reference=ref, stain_sample_spots=n_spots)
        normalizers = {s: state.stain_transform(images[s], size_um=size, pad_value=pad, cache_dir=pixels,
                                                image_id=ids[s]) for s in slides}
        log.info("stain normalisation (%s) to the reference of %s", fc.stain_norm, ", ".join(train_slides))
        got = _embed(cfg, [images[s] for s in slides], [ids[s] for s in slides], [normalizers[s] for s in slides],
                     size, keep=False)  # the cache's files, read slide by slide when needed
        embs = LazyEmbeddings({s: e.load for s, e in zip(slides, got)})
    views = {}
    if fc.stain_augment > 0:
        from gnnst.data.stain import HEDJitter

        jobs = [(s, v) for s in train_slides for v in range(1, fc.stain_augment + 1)]
        tf = [HEDJitter.draw(fc.stain_augment_sigma, fc.stain_augment_bias, (cfg.seed, s, v), before=normalizers[s])
              for s, v in jobs]
        log.info("stain augmentation: %d HED-jittered view(s) of %d training slide(s)", fc.stain_augment,
                 len(train_slides))
        got = _embed(cfg, [images[s] for s, _ in jobs], [ids[s] for s, _ in jobs], tf, size, keep=False)
        views = LazyEmbeddings({s: functools.partial(_stack, [functools.partial(embs.__getitem__, s)] + [
            e.load for (t, _), e in zip(jobs, got) if t == s]) for s in train_slides})  # read when a fit asks
    return FoldFeatures(embs=embs, views=views, stain_reference=ref)


def _stack(readers) -> np.ndarray:
    """``[V, N, D]``: the views ``readers`` (each ``() -> [N, D]``) read and stacked."""
    return np.stack([r() for r in readers])


def feature_state(cfg: "FeaturesConfig", train_x: Iterable[np.ndarray], stain_ref: "StainStats | None"
                  ) -> FeatureState:
    """The :class:`FeatureState` of a fit: ``train_x`` the training slides' embeddings (view 0), read only
    for ``features.slide_norm: standardize`` (a generator reads none otherwise)."""
    st = FeatureState(slide_norm=SlideNorm.fit(train_x, cfg.min_spots) if cfg.slide_norm == "standardize" else None,
                      stain_norm=cfg.stain_norm, stain_reference=stain_ref, stain_sample_spots=cfg.stain_sample_spots)
    st.check()
    return st
