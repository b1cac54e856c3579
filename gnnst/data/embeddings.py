"""Patch embeddings of a slide's spots, cached on disk apart from the graphs.

The cache key covers everything the embedding depends on (encoder weights and preprocessing, patch
size in µm, µm per pixel, the image file, the spot coordinates), so a rebuild that changes only the
graph or the gene panel re-encodes nothing, and any change that matters re-encodes.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst import keys
from gnnst.data.encoders import CPU_BATCH_SIZE
from gnnst.errors import GnnstError

if TYPE_CHECKING:
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


def cache_key(adata: "AnnData", *, encoder_identity: str, input_size: int, size_um: float, image_id: str) -> str:
    """Digest of everything an embedding depends on."""
    h = hashlib.sha256()
    mpp = adata.uns[keys.UNS_GNNST][keys.MPP]
    for part in (encoder_identity, str(input_size), f"{size_um:.6g}", f"{mpp:.9g}", image_id):
        h.update(part.encode())
        h.update(b"\0")
    if adata.uns[keys.UNS_GNNST].get(keys.IMAGE_SCALEF, 1.0) != 1.0:  # a downscaled image (keys of others unchanged)
        h.update(f"{adata.uns[keys.UNS_GNNST][keys.IMAGE_SCALEF]:.9g}".encode())
    h.update(np.ascontiguousarray(adata.obsm[keys.SPATIAL], dtype=np.float64).tobytes())
    h.update("\n".join(adata.obs_names).encode())
    return h.hexdigest()[:20]


def cache_path(
    adata: "AnnData", encoder: "PatchEncoder", *, size_um: float, cache_dir: Path, image_id: str | None = None
) -> Path:
    """Where the embeddings of ``adata``'s spots are cached under ``cache_dir``."""
    meta = adata.uns[keys.UNS_GNNST]
    if image_id is None:
        st = Path(meta[keys.IMAGE_PATH]).stat()
        image_id = f"{Path(meta[keys.IMAGE_PATH]).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = cache_key(adata, encoder_identity=encoder.identity, input_size=encoder.input_size, size_um=size_um,
                    image_id=image_id)
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


def embed_spots(
    adata: "AnnData",
    encoder: "PatchEncoder",
    *,
    size_um: float,
    batch_size: int = CPU_BATCH_SIZE,
    pad_value: int = 255,
    device=None,
    cache_dir: Path | None = None,
    image_id: str | None = None,
    image: "SlideImage | None" = None,
    timer: Timer | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings ``[N, D]`` float32 of the patches around ``adata``'s spots.

    Args:
        adata: canonical AnnData with ``obsm['spatial']`` (pixels) and ``uns['gnnst']`` holding ``mpp``
            and ``image_path``.
        encoder: the patch encoder.
        size_um: patch side in micrometres.
        batch_size: patches per forward pass.
        device: torch device of the encoder (default CPU).
        cache_dir: folder of cached embeddings (``None`` = no cache).
        image_id: identity of the image file (e.g. its sha256); default: path, size and mtime.
        image: the slide, already opened (e.g. decoded in a background thread); else opened here.
        timer: accumulates ``decode``, ``crop`` and ``encode`` seconds.
    """
    from tqdm.auto import tqdm

    from gnnst.data.images import open_image
    from gnnst.data.patches import check_inside, iter_patch_batches, patch_side_px
    from gnnst.data.validate import image_coordinates
    from gnnst.io import atomic_path

    timer = timer or Timer()
    meta = adata.uns[keys.UNS_GNNST]
    slide_id = str(adata.obs[keys.SLIDE_ID].iloc[0])
    image_path = meta.get(keys.IMAGE_PATH)
    if image_path is None:
        raise GnnstError(f"slide '{slide_id}': no image file to cut patches from")
    if meta.get(keys.MPP) is None:
        raise GnnstError(f"slide '{slide_id}': micrometres per pixel unknown; give scale.mpp in the manifest")
    path = None
    if cache_dir is not None:
        path = cache_path(adata, encoder, size_um=size_um, cache_dir=cache_dir, image_id=image_id)
        cached = load_cached(path, adata.n_obs, encoder.dim)
        if cached is not None:
            return cached
    if image is None:
        with timer("decode"):
            image = open_image(image_path, pad_value=pad_value)
    xy, image_mpp = image_coordinates(adata)  # [N, 2] pixels of the image read (may be a hires PNG)
    check_inside(xy, image.width, image.height, slide_id=slide_id, barcodes=adata.obs_names)
    side = patch_side_px(size_um, image_mpp)
    out = np.empty((adata.n_obs, encoder.dim), dtype=np.float32)
    batches = iter_patch_batches(image, xy, side_px=side, out_size=encoder.input_size, batch_size=batch_size)
    with tqdm(total=adata.n_obs, desc=f"encode {slide_id}", unit="spot", disable=not progress, leave=False) as bar:
        while True:
            with timer("crop"):
                item = next(batches, None)
            if item is None:
                break
            rows, patches = item
            with timer("encode"):
                if device is not None:
                    patches = patches.to(device)
                out[rows] = encoder.embed(patches).cpu().numpy()
            bar.update(rows.stop - rows.start)
    image.close()
    if not np.all(np.isfinite(out)):
        raise GnnstError(f"slide '{slide_id}': encoder '{encoder.name}' produced NaN embeddings")
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, emb=out, barcodes=np.asarray(adata.obs_names, dtype=str))
    return out
