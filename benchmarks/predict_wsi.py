"""Benchmark: `gnnst predict --grid-um` on synthetic whole slides of two sizes: peak memory and throughput.

    python benchmarks/predict_wsi.py [--sizes 20000 60000] [--repeats 3] [--grid-um 200] [--mpp 0.25]

Each slide is a tiled, JPEG-compressed pyramidal TIFF (levels 1, 2, 4, ... down to < 1024 px, one page
per level: openslide's generic-tiff layout) with the µm/px in its resolution tags, written tile by
tile so the writer never holds the image either. It is mostly white glass with a textured pink
ellipse of tissue whose size scales with the slide (a fixed fraction of its area), so the larger
slide has ~9x the pixels and ~9x the grid spots.

Every prediction runs in a fresh process (``gnnst predict`` as a user would call it) with an empty
embedding cache; its wall time and its own peak RSS (``os.wait4``) are recorded. The table gives
medians over ``--repeats`` runs, the ratio of the large slide's peak RSS to the small one's (the
baseline run in the same command), and the end-to-end spots per second against the encoder-only
rate measured here (random patches through the same encoder, same threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _child import run_gnnst  # noqa: E402
from _results import machine_info, write_section  # noqa: E402

TILE = 512
TISSUE_RADII = (0.2, 0.15)  # ellipse radii as fractions of the slide's width and height (~9% of its area)


def _tile(x0: int, y0: int, ds: int, width: int, height: int) -> np.ndarray:
    """Tile ``[TILE, TILE, 3]`` of the level with downsample ``ds`` whose top-left is level pixel (x0, y0)."""
    cx, cy = width / 2, height / 2
    rx, ry = TISSUE_RADII[0] * width, TISSUE_RADII[1] * height
    # level-0 extent of the tile, to skip the tissue maths on glass
    ax, ay, bx, by = x0 * ds, y0 * ds, (x0 + TILE) * ds, (y0 + TILE) * ds
    if bx < cx - rx or ax > cx + rx or by < cy - ry or ay > cy + ry:
        return np.full((TILE, TILE, 3), 245, np.uint8)
    yy, xx = np.mgrid[y0:y0 + TILE, x0:x0 + TILE].astype(np.float32) * ds  # level-0 coordinates
    tissue = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    t = np.full((TILE, TILE, 3), 245, np.uint8)
    if tissue.any():
        nuclei = (np.sin(xx / 23.0) * np.sin(yy / 19.0) > 0.6)  # dark blobs on pink stroma
        shade = (np.sin(xx / 61.0 + yy / 47.0) * 25).astype(np.int16)
        for c, (pink, purple) in enumerate(((225, 90), (130, 60), (190, 150))):
            v = np.where(nuclei, purple, pink).astype(np.int16) + shade
            t[..., c] = np.where(tissue, np.clip(v, 0, 255), 245)
    return t


def write_synthetic_slide(path: Path, size: int, mpp: float) -> dict:
    """A ``size`` x ``size`` pyramidal TIFF written tile by tile; returns its levels and file size."""
    import tifffile

    try:
        import imagecodecs  # noqa: F401

        compression = "jpeg"
    except ImportError:
        compression = "zlib"
    levels, ds = [], 1
    while size // ds >= 1024 or ds == 1:
        levels.append(ds)
        ds *= 2
    t0 = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, ds in enumerate(levels):
            w = h = size // ds

            def tiles(ds=ds, w=w, h=h):
                for y0 in range(0, h, TILE):
                    for x0 in range(0, w, TILE):
                        yield _tile(x0, y0, ds, size, size)

            tw.write(tiles(), shape=(h, w, 3), dtype="uint8", tile=(TILE, TILE), photometric="rgb",
                     compression=compression, resolution=(1e4 / (mpp * ds),) * 2, resolutionunit="CENTIMETER",
                     subfiletype=0 if i == 0 else 1)
    return {"levels": levels, "file_mb": path.stat().st_size / 2**20, "write_seconds": time.perf_counter() - t0,
            "compression": compression}


def encoder_only_rate(batch: int = 64, batches: int = 4) -> float:
    """Patches per second through the default encoder alone (random input, this process's threads)."""
    import torch

    from gnnst.data.encoders import create_encoder

    enc = create_encoder("efficientnet_lite0")
    x = torch.rand(batch, 3, enc.input_size, enc.input_size).contiguous(memory_format=torch.channels_last)
    enc.model.to(memory_format=torch.channels_last)
    enc.embed(x[:8])  # warm-up
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        enc.embed(x)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def make_checkpoint(path: Path, genes: int = 250) -> None:
    """An untrained model of the default size for the default encoder (memory and speed, not accuracy)."""
    from gnnst.data.encoders import create_encoder
    from gnnst.predictor import EncoderInfo, TrainedModel

    enc = EncoderInfo.of(create_encoder("efficientnet_lite0"))
    TrainedModel.untrained(enc, [f"G{i}" for i in range(genes)]).save(path)


def run(sizes: list[int], repeats: int, grid_um: float, mpp: float, workdir: Path) -> dict:
    import anndata as ad

    ck = workdir / "model.pt"
    make_checkpoint(ck)
    out = {"sizes": {}, "repeats": repeats, "grid_um": grid_um, "mpp": mpp}
    for size in sizes:
        slide = workdir / f"synthetic_{size}.tif"
        info = write_synthetic_slide(slide, size, mpp)
        runs = []
        for i in range(repeats):
            with tempfile.TemporaryDirectory(prefix="gnnst-wsi-", dir=workdir) as tmp:
                pred = Path(tmp) / "pred.h5ad"
                r = run_gnnst(["predict", "--checkpoint", ck, "--image", slide, "--grid-um", grid_um,
                               "--out", pred, "--cache-dir", Path(tmp) / "cache", "--quiet"])
                a = ad.read_h5ad(pred, backed="r")
                n, per_spot = a.n_obs, int(a.uns["gnnst"]["grid"]["patches_per_spot"])
                a.file.close()
            runs.append({"seconds": r.seconds, "peak_rss_mb": r.peak_rss_mb, "spots": n, "patches": n * per_spot})
            print(f"  {size} px, run {i + 1}: {n} spots, {r.seconds:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB",
                  flush=True)
        sec = statistics.median(x["seconds"] for x in runs)
        out["sizes"][size] = {**info, "spots": runs[0]["spots"], "patches": runs[0]["patches"], "seconds": sec,
                              "spots_per_s": runs[0]["spots"] / sec, "patches_per_s": runs[0]["patches"] / sec,
                              "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in runs),
                              "peak_rss_all": [x["peak_rss_mb"] for x in runs],
                              "seconds_all": [x["seconds"] for x in runs],
                              "rgb_gb": size * size * 3 / 1e9}
        slide.unlink()
    out["encoder_patches_per_s"] = encoder_only_rate()
    return out


def format_table(r: dict) -> str:
    sizes = sorted(r["sizes"], key=int)
    base = r["sizes"][sizes[0]]
    rows = ["| slide (px) | level-0 RGB if decoded whole | file (MB) | grid spots | patches | wall time (s) | "
            "spots/s | patches/s | peak RSS (MB) | RSS vs smallest |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizes:
        v = r["sizes"][s]
        rows.append(f"| {int(s):,} x {int(s):,} | {v['rgb_gb']:.1f} GB | {v['file_mb']:.0f} | {v['spots']} | "
                    f"{v['patches']} | {v['seconds']:.1f} | {v['spots_per_s']:.1f} | {v['patches_per_s']:.1f} | "
                    f"{v['peak_rss_mb']:.0f} | "
                    f"{v['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")
    big = r["sizes"][sizes[-1]]
    rows += [
        "",
        f"- Synthetic pyramidal TIFFs ({big['compression']}, {TILE}-px tiles, levels "
        f"{', '.join(map(str, big['levels']))}), {r['mpp']} µm/px, tissue ellipse ~9% of the area; grid "
        f"{r['grid_um']:g} µm hex, default `--supersample 2` (4 patches per spot); default encoder "
        "(efficientnet_lite0, 150 µm patches read at pyramid level 1); "
        f"medians of {r['repeats']} runs, each a fresh `gnnst predict` process with an empty embedding cache.",
        f"- Peak RSS per run (MB): " + "; ".join(
            f"{int(s):,} px: {', '.join(f'{m:.0f}' for m in r['sizes'][s]['peak_rss_all'])}" for s in sizes) + ".",
        f"- Wall time per run (s): " + "; ".join(
            f"{int(s):,} px: {', '.join(f'{m:.1f}' for m in r['sizes'][s]['seconds_all'])}" for s in sizes) + ".",
        f"- Encoder alone, same machine and threads: {r['encoder_patches_per_s']:.1f} patches/s; end to end the "
        f"large slide reached {big['patches_per_s'] / r['encoder_patches_per_s']:.0%} of it (the rest: process "
        "start and imports, model load, tissue detection, patch reads, graph, prediction, writing, maps).",
    ]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 60000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grid-um", type=float, default=200.0)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--workdir", default=None, help="where the synthetic slides go (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--note", default="", help="a remark to record with the table (e.g. a shared machine)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gnnst-wsi-", dir=args.workdir) as tmp:
        r = run(args.sizes, args.repeats, args.grid_um, args.mpp, Path(tmp))
    load = os.getloadavg()
    body = format_table(r) + (f"\n- Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                              f"(1 / 5 / 15 min) on {len(os.sched_getaffinity(0))} cores."
                              + (f"\n- Note: {args.note}" if args.note else ""))
    print(machine_info())
    print(body)
    if not args.no_write:
        write_section("predict_wsi", "H&E-only whole-slide prediction: memory and throughput "
                      "(`benchmarks/predict_wsi.py`)", body)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "predict_wsi.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
