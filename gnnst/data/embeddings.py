"""Patch embeddings of slides' spots, cached on disk apart from the graphs.

The cache key covers everything the embedding depends on (encoder weights and preprocessing, its
precision, patch size in µm, µm per pixel, the image file, the spot coordinates), so a rebuild that
changes only the graph or the gene panel re-encodes nothing, and any change that matters re-encodes.
Batch size and worker count do not enter it: they do not change the embeddings.

:func:`embed_slides` keeps the encoder busy: patches are cut in worker processes
(:class:`~gnnst.data.patches.PatchStream`), patches of any slides are packed into batches of one fixed
shape (the last one padded), so the device sees a single input shape per run (one cuDNN set-up); on
CUDA the crops cross in pinned memory with non-blocking copies, are resampled there, and each batch's
result is read back while the next batch runs.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from gnnst.data.encoders import PatchEncoder
    from gnnst.data.images import SlideImage


class Timer:
    """Accumulates wall time per stage: ``with timer('decode'): ...``; ``timer.totals`` in seconds."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[stage] += time.perf_counter() - self.t0

        return _Ctx()


def cache_key(adata: "AnnData", *, encoder_identity: str, input_size: int, size_um: float, image_id: str,
              transform: str | None = None) -> str:
    """Digest of everything an embedding depends on; ``transform``: the ``identity`` of what was done to the
    patches before the encoder (stain normalisation or augmentation, :mod:`gnnst.data.stain`)."""
    h = hashlib.sha256()
    mpp = adata.uns[keys.UNS_GNNST][keys.MPP]
    for part in (encoder_identity, str(input_size), f"{size_um:.6g}", f"{mpp:.9g}", image_id):
        h.update(part.encode())
        h.update(b"\0")
    if adata.uns[keys.UNS_GNNST].get(keys.IMAGE_SCALEF, 1.0) != 1.0:  # a downscaled image (keys of others unchanged)
        h.update(f"{adata.uns[keys.UNS_GNNST][keys.IMAGE_SCALEF]:.9g}".encode())
    h.update(np.ascontiguousarray(adata.obsm[keys.SPATIAL], dtype=np.float64).tobytes())
    h.update("\n".join(adata.obs_names).encode())
    if transform is not None:  # untransformed patches keep the keys they always had
        h.update(f"\0transform:{transform}".encode())
    return h.hexdigest()[:20]


def default_image_id(adata: "AnnData") -> str:
    """Identity of a slide's image file when no checksum is known: path, size and modification time."""
    from gnnst.io import file_identity

    return file_identity(adata.uns[keys.UNS_GNNST][keys.IMAGE_PATH])


def cache_path(
    adata: "AnnData", encoder: "PatchEncoder", *, size_um: float, cache_dir: Path, image_id: str | None = None,
    transform=None,
) -> Path:
    """Where the embeddings of ``adata``'s spots are cached under ``cache_dir`` (``transform``: applied to
    the patches first, keyed by its ``identity``)."""
    key = cache_key(adata, encoder_identity=encoder.cache_identity, input_size=encoder.input_size, size_um=size_um,
                    image_id=image_id or default_image_id(adata),
                    transform=None if transform is None else transform.identity)
    return Path(cache_dir) / encoder.key / f"{adata.obs[keys.SLIDE_ID].iloc[0]}-{key}.npz"


def load_cached(path: Path | None, n: int, dim: int) -> np.ndarray | None:
    """Cached embeddings ``[n, dim]`` at ``path``, or ``None`` when absent or of another shape."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            emb = z["emb"]
    except Exception:  # a damaged cache entry is recomputed
        return None
    return emb if emb.shape == (n, dim) else None


def cached_ok(path: Path | None, n: int, dim: int) -> bool:
    """Whether ``path`` holds cached embeddings ``[n, dim]``, from the array's header and its size in the
    file, without reading the array (:func:`load_cached` reads it, and recomputes a damaged entry)."""
    import zipfile

    if path is None or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("emb.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
    except Exception:  # noqa: BLE001 - not a readable entry: computed again
        return False
    return tuple(shape) == (n, dim) and info.file_size >= n * dim * dtype.itemsize


class CachedEmbeddings:
    """A slide's embeddings ``[n, dim]`` float32 in its cache file (:func:`embed_slides` with ``keep=False``),
    read by :meth:`load` each time they are needed."""

    def __init__(self, path: Path, n: int, dim: int):
        self.path, self.n, self.dim = Path(path), int(n), int(dim)

    def load(self) -> np.ndarray:
        emb = load_cached(self.path, self.n, self.dim)
        if emb is None:
            raise GnnstError(f"{self.path}: the cached embeddings of this run are gone or damaged (was the cache "
                             f"folder cleaned during the run?); run it again")
        return emb

    def __repr__(self) -> str:
        return f"CachedEmbeddings({str(self.path)!r}, n={self.n}, dim={self.dim})"


class BatchRunner:
    """Runs an encoder on batches of exactly ``batch_size`` patches, whatever slides they come from.

    :meth:`add` copies patches into a device buffer and runs the encoder each time it is full;
    :meth:`flush` runs the rest, padded with zeros (the encoder treats every patch on its own, so the
    padding changes no embedding). On CUDA a batch's result is copied back into pinned memory without
    waiting, and collected while the next batch runs.

    Args:
        encoder: the encoder, already on ``device``.
        batch_size: patches per forward pass.
        device: where the encoder runs.

    Both methods return ``[(slide, start, emb)]``: embeddings ``[k, D]`` float32 of rows
    ``start:start + k`` of slide ``slide``, for the batches that finished.
    """

    def __init__(self, encoder: "PatchEncoder", batch_size: int, device: "torch.device"):
        import torch

        self.encoder, self.batch_size, self.device = encoder, batch_size, device
        s = encoder.input_size
        self.buf = torch.zeros((batch_size, 3, s, s), device=device).contiguous(memory_format=torch.channels_last)
        self.fill = 0
        self.segments: list[tuple[int, int, int, int]] = []  # (slide, start, offset in buf, count)
        self.pending = None  # (segments, host tensor, event) of the batch still being read back
        self.batches = 0

    def add(self, slide: int, start: int, x: "torch.Tensor") -> list:
        """Queue patches ``x`` ``[k, 3, S, S]`` (on the device) of rows ``start:start + k`` of ``slide``."""
        done, k, taken = [], len(x), 0
        while taken < k:
            n = min(k - taken, self.batch_size - self.fill)
            self.buf[self.fill:self.fill + n].copy_(x[taken:taken + n], non_blocking=True)
            self.segments.append((slide, start + taken, self.fill, n))
            self.fill += n
            taken += n
            if self.fill == self.batch_size:
                done += self._run()
        return done

    def flush(self) -> list:
        """Run what is queued (padded) and collect every result."""
        done = []
        if self.fill:
            self.buf[self.fill:].zero_()
            done += self._run()
        return done + self._collect()

    def _run(self) -> list:
        import torch

        out = self.encoder.embed(self.buf)  # [B, D] float32
        self.batches += 1
        segments, self.segments, self.fill = self.segments, [], 0
        done = self._collect()
        if self.device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (segments, host, event)
        else:
            self.pending = (segments, out, None)
        return done

    def _collect(self) -> list:
        if self.pending is None:
            return []
        segments, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        emb = host.numpy()
        return [(slide, start, emb[off:off + n]) for slide, start, off, n in segments]


def _slide_id(adata: "AnnData") -> str:
    return str(adata.obs[keys.SLIDE_ID].iloc[0])


def embed_slides(
    adatas: Sequence["AnnData"],
    encoder: "PatchEncoder",
    *,
    size_um: float,
    batch_size: int | None = None,
    num_workers: int = 0,
    pad_value: int = 255,
    device=None,
    cache_dir: Path | None = None,
    image_ids: Sequence[str | None] | None = None,
    images: dict[int, "SlideImage"] | None = None,
    timer: Timer | None = None,
    progress: bool = True,
    transforms: Sequence | None = None,
    cache_crops: bool = False,
    keep: bool = True,
) -> list:
    """Embeddings ``[N_i, D]`` float32 of the patches around each slide's spots, in the order given.

    Every slide is checked (image file, µm per pixel, spots inside the image) before any is encoded;
    each slide's embeddings are cached as soon as its last patch is encoded.

    Args:
        adatas: canonical AnnData, one per slide, with ``obsm['spatial']`` (pixels) and ``uns['gnnst']``
            holding ``mpp`` and ``image_path``.
        encoder: the patch encoder, already on ``device``.
        size_um: patch side in micrometres.
        batch_size: patches per forward pass (default: :func:`~gnnst.data.encoders.default_batch_size`).
        num_workers: processes cutting patches (0: this process, with the next image decoded in a thread).
        device: torch device of the encoder (default CPU).
        cache_dir: folder of cached embeddings (``None`` = no cache).
        image_ids: identity of each image file (e.g. its sha256); default: path, size and mtime.
        images: slides already opened, by position in ``adatas`` (used when ``num_workers == 0``).
        timer: accumulates ``decode`` and ``crop`` (seconds summed over workers), ``patch_wait`` (the
            encoder waiting for patches) and ``encode``.
        transforms: per slide, ``None`` or a transform of its ``uint8`` crops (stain normalisation or
            augmentation, :mod:`gnnst.data.stain`), keyed in the cache by its ``identity``.
        cache_crops: keep whole-image slides' raw crops in this process (:data:`gnnst.data.patches.CROPS`)
            for a later call that cuts them again (e.g. the next fold's normalisation); ``num_workers == 0``.
        keep: ``False`` (needs ``cache_dir``): return each slide's :class:`CachedEmbeddings` (its cache file,
            read on demand) instead of the array, and hold a slide's array only while it is encoded, so a
            cohort's embeddings are never all in memory.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from gnnst.data.encoders import default_batch_size
    from gnnst.data.images import probe_image
    from gnnst.data.patches import PatchPlan, PatchStream, check_inside, patch_side_px, to_input
    from gnnst.data.validate import image_coordinates
    from gnnst.io import atomic_path

    timer = timer or Timer()
    device = torch.device(device or "cpu")
    batch_size = batch_size or default_batch_size(device)
    image_ids = list(image_ids) if image_ids is not None else [None] * len(adatas)
    transforms = list(transforms) if transforms is not None else [None] * len(adatas)
    if not keep and cache_dir is None:
        raise GnnstError("embed_slides(keep=False) needs a cache_dir: the embeddings are handed back as its files")
    out: list = [None] * len(adatas)
    todo, paths = [], {}
    for i, a in enumerate(adatas):
        meta, sid = a.uns[keys.UNS_GNNST], _slide_id(a)
        if meta.get(keys.IMAGE_PATH) is None:
            raise GnnstError(f"slide '{sid}': no image file to cut patches from")
        if meta.get(keys.MPP) is None:
            raise GnnstError(f"slide '{sid}': micrometres per pixel unknown; give scale.mpp in the manifest")
        if cache_dir is not None:
            paths[i] = cache_path(a, encoder, size_um=size_um, cache_dir=cache_dir, image_id=image_ids[i],
                                  transform=transforms[i])
            if keep:
                out[i] = load_cached(paths[i], a.n_obs, encoder.dim)
            elif cached_ok(paths[i], a.n_obs, encoder.dim):  # its header checked; the array read on demand
                out[i] = CachedEmbeddings(paths[i], a.n_obs, encoder.dim)
        if out[i] is None:
            todo.append(i)
    if not todo:
        return out
    plans = []
    for i in todo:  # every slide checked before any work
        a = adatas[i]
        meta = a.uns[keys.UNS_GNNST]
        xy, image_mpp = image_coordinates(a)  # [N, 2] pixels of the image read (may be a hires PNG)
        if i in (images or {}):
            im = images[i]
            width, height, downsamples = im.width, im.height, im.level_downsamples
        else:
            width, height, downsamples = probe_image(meta[keys.IMAGE_PATH])
        check_inside(xy, width, height, slide_id=_slide_id(a), barcodes=a.obs_names)
        plans.append(PatchPlan.make(_slide_id(a), meta[keys.IMAGE_PATH], xy,
                                    side_px=patch_side_px(size_um, image_mpp), out_size=encoder.input_size,
                                    downsamples=downsamples, pad_value=pad_value, transform=transforms[i]))
    on_cuda = device.type == "cuda"
    stream = PatchStream(plans, rows=batch_size, workers=num_workers, out_size=encoder.input_size,
                         interpolation=encoder.interpolation, resize=not on_cuda,
                         images={k: images[i] for k, i in enumerate(todo) if i in (images or {})} if not num_workers
                         else None, cache_crops=cache_crops)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=on_cuda,
                        prefetch_factor=4 if num_workers else None, persistent_workers=False)
    result: dict[int, np.ndarray] = {}  # a slide's array from its first encoded patch to its last
    left = {k: len(p.xy) for k, p in enumerate(plans)}
    runner = BatchRunner(encoder, batch_size, device)

    def finish(k: int) -> None:
        i, emb = todo[k], result.pop(k)
        if not np.all(np.isfinite(emb)):
            raise GnnstError(f"slide '{plans[k].slide_id}': encoder '{encoder.name}' produced NaN embeddings")
        out[i] = emb if keep else CachedEmbeddings(paths[i], len(emb), encoder.dim)
        if i in paths:
            with atomic_path(paths[i]) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, emb=emb, barcodes=np.asarray(adatas[i].obs_names, dtype=str))

    def store(done: list) -> None:
        for k, start, emb in done:
            if k not in result:
                result[k] = np.empty((len(plans[k].xy), encoder.dim), dtype=np.float32)
            result[k][start:start + len(emb)] = emb
            left[k] -= len(emb)
            bar.update(len(emb))
            if left[k] == 0:
                finish(k)

    total = sum(left.values())
    with tqdm(total=total, desc="encode", unit="spot", disable=not progress, leave=False) as bar:
        items = iter(loader)
        while True:
            with timer("patch_wait"):
                item = next(items, None)
            if item is None:
                break
            if "error" in item:
                raise GnnstError(item["error"])
            timer.totals["decode"] += item["decode"]
            timer.totals["crop"] += item["crop"]
            with timer("encode"):
                x = item["patches"]
                if on_cuda:  # uint8 crops, resampled on the device
                    x = to_input(x.to(device, non_blocking=True), encoder.input_size, encoder.interpolation)
                store(runner.add(item["slide"], item["start"], x))
        with timer("encode"):
            store(runner.flush())
    if any(left.values()):  # pragma: no cover - every unit is read or an error is raised
        k = next(k for k, v in left.items() if v)
        raise GnnstError(f"slide '{plans[k].slide_id}': {left[k]} patches were never cut")
    return out


def embed_spots(
    adata: "AnnData",
    encoder: "PatchEncoder",
    *,
    size_um: float,
    batch_size: int | None = None,
    pad_value: int = 255,
    device=None,
    cache_dir: Path | None = None,
    image_id: str | None = None,
    image: "SlideImage | None" = None,
    timer: Timer | None = None,
    progress: bool = True,
    num_workers: int = 0,
    transform=None,
) -> np.ndarray:
    """Embeddings ``[N, D]`` float32 of the patches around one slide's spots (see :func:`embed_slides`).

    ``image``: the slide, already opened (e.g. decoded in a background thread); else opened here.
    ``transform``: applied to the patches first (:mod:`gnnst.data.stain`).
    """
    return embed_slides([adata], encoder, size_um=size_um, batch_size=batch_size, num_workers=num_workers,
                        pad_value=pad_value, device=device, cache_dir=cache_dir, image_ids=[image_id],
                        images={0: image} if image is not None else None, timer=timer, progress=progress,
                        transforms=[transform])[0]
