"""Embedding many slides: packed fixed-shape batches, worker processes, precision, the cache key."""

from __future__ import annotations

import numpy as np
import pytest

from gnnst.data.embeddings import cache_path, embed_slides
from gnnst.data.patches import split_units
from gnnst.errors import GnnstError


@pytest.fixture(scope="module")
def lite0():
    import torch

    from gnnst.data.encoders import create_encoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield create_encoder("efficientnet_lite0").to(torch.device("cpu"))
    torch.set_num_threads(threads)


@pytest.fixture
def slides(tiny_dataset):
    from gnnst.data.manifest import load_manifest
    from gnnst.data.slides import read_slide

    m = load_manifest(tiny_dataset["manifest"])
    return [read_slide(m, e, data_root=tiny_dataset["root"], cache_dir=tiny_dataset["cache"], download=False)
            for e in m.select(None)]


def one_slide_at_a_time(adata, enc, size_um=150.0, batch_size=6):
    """How gnnst embedded a slide before batches were packed: its own batches, the last one short."""
    from gnnst import keys
    from gnnst.data.images import open_image
    from gnnst.data.patches import iter_patch_batches, patch_side_px

    meta = adata.uns[keys.UNS_GNNST]
    with open_image(meta[keys.IMAGE_PATH]) as im:
        return np.concatenate([enc.embed(p).numpy() for _, p in iter_patch_batches(
            im, np.asarray(adata.obsm[keys.SPATIAL]), side_px=patch_side_px(size_um, meta[keys.MPP]),
            out_size=enc.input_size, batch_size=batch_size)])


@pytest.mark.parametrize("batch_size, workers", [(6, 0), (7, 0), (5, 2), (64, 1)])
def test_packed_and_padded_batches_give_the_same_embeddings(slides, lite0, batch_size, workers):
    """Batches spanning two slides, a zero-padded last batch and worker processes change no bit of
    the float32 embeddings on CPU at the CPU batch sizes; a batch of 64 takes other convolution
    kernels (oneDNN picks them by batch size), equal to float rounding."""
    ref = [one_slide_at_a_time(a, lite0) for a in slides]
    got = embed_slides(slides, lite0, size_um=150.0, batch_size=batch_size, num_workers=workers, progress=False)
    assert [g.shape for g in got] == [(12, 1280), (12, 1280)]
    for r, g in zip(ref, got):
        if batch_size <= 8:
            assert r.tobytes() == g.tobytes()
        else:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_cache_key_follows_precision_not_batch_or_workers(slides, lite0, tmp_path):
    import torch

    got = embed_slides(slides, lite0, size_um=150.0, batch_size=6, num_workers=0, cache_dir=tmp_path, progress=False)
    files = sorted(tmp_path.rglob("*.npz"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = embed_slides(slides, lite0, size_um=150.0, batch_size=5, num_workers=2, cache_dir=tmp_path, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not recomputed
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, again))
    fp32 = cache_path(slides[0], lite0, size_um=150.0, cache_dir=tmp_path)
    assert lite0.cache_identity == lite0.identity  # float32 keys are those of earlier versions
    lite0.precision = "bfloat16"
    try:
        assert lite0.cache_identity.endswith(":bfloat16")
        assert cache_path(slides[0], lite0, size_um=150.0, cache_dir=tmp_path) != fp32
    finally:
        lite0.to(torch.device("cpu"), "float32")
    assert cache_path(slides[0], lite0, size_um=112.0, cache_dir=tmp_path) != fp32


def test_keep_false_hands_back_the_cache_files_and_holds_no_slide(slides, lite0, tmp_path, monkeypatch):
    """keep=False: each slide's CachedEmbeddings (encoded now, or found in the cache without reading the
    array), whose load() is the array keep=True gives; without a cache folder it is refused."""
    from gnnst.data import embeddings
    from gnnst.data.embeddings import CachedEmbeddings, cached_ok

    kw = dict(size_um=150.0, batch_size=6, num_workers=0, cache_dir=tmp_path, progress=False)
    fresh = embed_slides(slides, lite0, keep=False, **kw)  # encoded by this call
    assert all(isinstance(e, CachedEmbeddings) for e in fresh)
    kept = embed_slides(slides, lite0, **kw)  # the arrays, from the cache
    reads, load = [], embeddings.load_cached
    monkeypatch.setattr(embeddings, "load_cached", lambda *a: reads.append(a[0]) or load(*a))
    found = embed_slides(slides, lite0, keep=False, **kw)  # found in the cache
    assert reads == [] and all(isinstance(e, CachedEmbeddings) for e in found)  # no array read yet
    assert not cached_ok(fresh[0].path, fresh[0].n + 1, fresh[0].dim)  # another shape: computed again
    (tmp_path / "bad.npz").write_bytes(fresh[0].path.read_bytes()[:200])  # a cut file: computed again
    assert not cached_ok(tmp_path / "bad.npz", fresh[0].n, fresh[0].dim)
    for a, b, c in zip(fresh, kept, found):
        assert a.load().tobytes() == b.tobytes() == c.load().tobytes()
    with pytest.raises(GnnstError, match="needs a cache_dir"):
        embed_slides(slides, lite0, keep=False, **{**kw, "cache_dir": None})
    fresh[0].path.unlink()
    with pytest.raises(GnnstError, match="gone or damaged"):
        fresh[0].load()


def test_bfloat16_moves_the_embeddings_a_little(slides, lite0):
    import torch

    ref = embed_slides(slides[:1], lite0, size_um=150.0, num_workers=0, progress=False)[0]
    try:
        lite0.to(torch.device("cpu"), "bfloat16")
        low = embed_slides(slides[:1], lite0, size_um=150.0, num_workers=0, progress=False)[0]
    finally:
        lite0.to(torch.device("cpu"), "float32")
    assert low.dtype == np.float32 and not np.array_equal(low, ref)
    cos = (low * ref).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98, cos.min()


def test_a_slide_a_worker_cannot_read_is_a_one_line_error(slides, lite0, tiny_dataset, tmp_path):
    img = tiny_dataset["root"] / "S2_HE.jpg"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3])  # the header survives, the pixels do not
    with pytest.raises(GnnstError) as e:
        embed_slides(slides, lite0, size_um=150.0, num_workers=2, cache_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("slide 'S2': ") and "S2_HE.jpg" in msg
    assert not [p for p in tmp_path.rglob("*.npz") if p.name.startswith("S2-")]


def test_every_slide_is_checked_before_any_is_encoded(slides, lite0, tmp_path):
    from gnnst import keys

    slides[1].obsm[keys.SPATIAL] = slides[1].obsm[keys.SPATIAL] + 1e4
    with pytest.raises(GnnstError, match=r"slide 'S2': spot .* lies outside the image"):
        embed_slides(slides, lite0, size_um=150.0, num_workers=0, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.npz"))  # S1 was not encoded either


def test_work_units_cover_every_spot_once():
    assert split_units([10, 3], rows=4, workers=1) == [(0, 0, 10), (1, 0, 3)]
    assert split_units([10, 3], rows=4, workers=4) == [(0, 0, 8), (0, 8, 10), (1, 0, 3)]
    assert split_units([10, 3], rows=4, workers=4, splittable=[False, True]) == [(0, 0, 10), (1, 0, 3)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = list(rng.integers(1, 60, size=rng.integers(1, 6)))
        rows, workers = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        units = split_units(sizes, rows=rows, workers=workers)
        for i, n in enumerate(sizes):
            mine = sorted((a, b) for s, a, b in units if s == i)
            assert mine[0][0] == 0 and mine[-1][1] == n
            assert all(b0 == a1 for (_, b0), (a1, _) in zip(mine, mine[1:]))  # contiguous, no overlap
            assert all(a % rows == 0 for a, _ in mine)
            assert len(mine) <= max(workers, 1)


def test_batch_runner_packs_slides_into_fixed_shapes(lite0):
    import torch

    from gnnst.data.embeddings import BatchRunner

    seen = []
    real = lite0.model.forward

    def spy(x):
        seen.append(tuple(x.shape))
        return real(x)

    lite0.model.forward = spy
    try:
        runner = BatchRunner(lite0, 4, torch.device("cpu"))
        x = torch.rand(7, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        done = runner.add(0, 0, x[:3]) + runner.add(1, 10, x[3:]) + runner.flush()
    finally:
        del lite0.model.forward
    assert seen == [(4, 3, 224, 224)] * 2  # one shape, the second batch padded
    assert [(s, a, len(e)) for s, a, e in done] == [(0, 0, 3), (1, 10, 1), (1, 11, 3)]
    ref = lite0.embed(x).numpy()
    assert np.concatenate([e for _, _, e in done]).tobytes() == ref.tobytes()


def test_whole_slide_image_is_read_by_each_worker_through_its_own_openslide_handle(tmp_path, lite0):
    """A pyramidal TIFF (openslide): two workers give what this process gives, read from level 1."""
    import anndata as ad
    import pandas as pd
    import tifffile

    from gnnst import keys
    from gnnst.data.images import probe_image
    from gnnst.data.patches import PatchPlan

    rng = np.random.default_rng(0)
    base = (rng.random((160, 200, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)  # 1600 x 1280 px
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate((1, 2, 4)):
            tw.write(base[::ds, ::ds], tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=0 if i == 0 else 1, resolution=(1e4 / (0.5 * ds),) * 2, resolutionunit="CENTIMETER")
    xy = rng.uniform(100, 1100, size=(9, 2))
    a = ad.AnnData(X=np.zeros((9, 1), np.float32), obs=pd.DataFrame({keys.SLIDE_ID: ["W"] * 9},
                                                                    index=[f"s{i}" for i in range(9)]))
    a.obsm[keys.SPATIAL] = xy
    a.uns[keys.UNS_GNNST] = {keys.MPP: 0.5, keys.IMAGE_PATH: str(path)}
    w, h, ds = probe_image(path)
    assert (w, h) == (1600, 1280) and len(ds) >= 2
    plan = PatchPlan.make("W", str(path), xy, side_px=500, out_size=224, downsamples=ds)
    assert plan.level == 1 and plan.read_px == 250  # 250 µm = 500 px at level 0, read at half resolution
    here = embed_slides([a], lite0, size_um=250.0, num_workers=0, progress=False)[0]
    workers = embed_slides([a], lite0, size_um=250.0, num_workers=2, batch_size=4, progress=False)[0]
    assert here.shape == (9, 1280) and here.tobytes() == workers.tobytes()


def test_crops_resampled_where_the_encoder_runs_equal_those_resampled_in_the_worker(slides):
    """The CUDA path ships uint8 crops and resamples them on the device; on any device the patches are
    those a CPU worker makes."""
    import torch
    from torch.utils.data import DataLoader

    from gnnst import keys
    from gnnst.data.images import probe_image
    from gnnst.data.patches import PatchPlan, PatchStream, patch_side_px, to_input

    a = slides[0]
    meta = a.uns[keys.UNS_GNNST]
    plan = PatchPlan.make("S1", meta[keys.IMAGE_PATH], a.obsm[keys.SPATIAL], side_px=patch_side_px(150.0, meta[keys.MPP]),
                          out_size=224, downsamples=probe_image(meta[keys.IMAGE_PATH])[2])

    def items(resize):
        return list(DataLoader(PatchStream([plan], rows=5, workers=1, out_size=224, resize=resize),
                               batch_size=None, num_workers=1))

    crops, ready = items(False), items(True)
    assert [(c["start"], c["patches"].dtype, c["patches"].shape[1:]) for c in crops] == \
           [(0, torch.uint8, (30, 30, 3)), (5, torch.uint8, (30, 30, 3)), (10, torch.uint8, (30, 30, 3))]
    for c, r in zip(crops, ready):  # equal up to rounding: the worker resamples with 1 thread, this process with more
        torch.testing.assert_close(to_input(c["patches"], 224), r["patches"], rtol=0, atol=1e-6)


def test_kept_crops_give_the_same_patches_and_the_image_is_decoded_once(slides, monkeypatch):
    """``cache_crops``: a whole-image slide cut a second time (another fold's normalisation) comes from the
    raw crops kept in the process, with the transform applied to them: the same patches, no second decode."""
    import torch

    from gnnst import keys
    from gnnst.data import images, patches
    from gnnst.data.images import probe_image
    from gnnst.data.patches import CROPS, PatchPlan, PatchStream, patch_side_px
    from gnnst.data.stain import HEDJitter

    opened = []
    real_open = images.open_image
    monkeypatch.setattr(images, "open_image", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    CROPS.clear()
    plans = []
    for a in slides[:2]:
        meta = a.uns[keys.UNS_GNNST]
        plans.append(PatchPlan.make(a.obs[keys.SLIDE_ID].iloc[0], meta[keys.IMAGE_PATH], a.obsm[keys.SPATIAL],
                                    side_px=patch_side_px(150.0, meta[keys.MPP]), out_size=224,
                                    downsamples=probe_image(meta[keys.IMAGE_PATH])[2]))

    def cut(ps, cache):
        return torch.cat([b["patches"] for b in PatchStream(ps, rows=4, workers=0, out_size=224, cache_crops=cache)])

    jitter = [HEDJitter([1.1, 0.9, 1.0], [0.01, -0.01, 0.0]) for _ in plans]
    for tf in (None, jitter):
        ps = plans if tf is None else [patches.dataclasses.replace(p, transform=t) for p, t in zip(plans, tf)]
        want = cut(ps, cache=False)
        n = len(opened)
        assert torch.equal(cut(ps, cache=True), want)
        assert torch.equal(cut(ps, cache=True), want)  # served from the kept crops
        assert len(opened) - n == (2 if tf is None else 0)  # decoded once each, by the first cached pass
    assert CROPS.nbytes == sum(len(p.xy) * p.read_px ** 2 * 3 for p in plans)
    CROPS.clear()


def test_crop_cache_keeps_to_its_budget_least_recently_used_out_first():
    from gnnst.data.patches import CropCache

    c = CropCache(budget=250)
    a, b, d = (np.zeros(100, dtype=np.uint8) + v for v in (1, 2, 3))
    c.put(("a",), a)
    c.put(("b",), b)
    assert c.get(("a",)) is a  # a used last: b goes first
    c.put(("d",), d)
    assert c.get(("b",)) is None and c.get(("a",)) is a and c.get(("d",)) is d and c.nbytes == 200
    c.put(("big",), np.zeros(300, dtype=np.uint8))  # over the budget on its own: not kept, nothing evicted
    assert c.get(("big",)) is None and c.nbytes == 200
    assert not a.flags.writeable


def test_stain_sample_is_the_same_from_kept_crops(slides, monkeypatch):
    from gnnst.data import patches
    from gnnst.data.stain import sample_pixels

    patches.CROPS.clear()
    monkeypatch.setattr(patches.CROPS, "budget", 0)  # nothing fits: the sampled spots are cut alone
    alone = sample_pixels(slides[0], size_um=150.0, n_spots=5)
    monkeypatch.setattr(patches.CROPS, "budget", 1 << 30)
    kept = sample_pixels(slides[0], size_um=150.0, n_spots=5)
    assert patches.CROPS.nbytes > 0 and np.array_equal(kept, alone)
    patches.CROPS.clear()
