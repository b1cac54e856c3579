"""Benchmark: patch embedding, the encoder alone beside the whole build, on CPU or CUDA.

    python benchmarks/embed.py [--device auto|cpu|cuda] [--repeats 3] [--fm uni] [--fm-slides C3]
                               [--cohort 200x2000] [--workers 1 2 4 8] [--data-root DIR] [--no-write]

Every measurement runs in a fresh child process (imports and model load included where a user's
command would pay them), medians over ``--repeats``:

1. **Encoder alone**: random input ``[B, 3, S, S]`` at the device's batch size and precision
   (``encoder.batch_size`` / ``encoder.precision`` defaults; float32 beside it as the baseline), for
   the default encoder and one foundation-model architecture (``--fm``, random weights): patches/s
   after one warm-up batch, and the first batch's seconds (model set-up, cuDNN).
2. **Whole cold build** (``gnnst build-graphs``, empty embedding cache) of her2st-6 with the default
   encoder, and of ``--fm-slides`` with the foundation model (random weights written in its authors'
   file layout): end-to-end patches/s, the encode stage's patches/s against the encoder alone, the
   stage split, and the process's CPU seconds (workers included; less inflated than wall time by
   other jobs on a shared machine).
3. **bfloat16 drift** of the default encoder on her2st patches (CUDA when present, else CPU autocast).
4. **Synthetic cohort** (``--cohort SLIDESxSPOTS``, small JPEGs, legacy-ST layout written here):
   cold builds with ``encoder.num_workers`` in ``--workers``; time per worker count against the first.

Prints the tables and writes the section ``embed`` of ``benchmarks/RESULTS.md`` (and ``results/embed.json``).
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # the gnnst of this checkout, whatever is installed

from _results import publish  # noqa: E402


def _in_child(fn, *args):
    # a fresh interpreter per measurement; spawned, not forked: this process has used torch's thread pool
    # (writing the random checkpoint), which a forked child would inherit locked
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def encoder_alone(name: str, device: str, precision: str, batch: int | None, n_batches: int, threads: int | None) -> dict:
    """Patches/s of the encoder on random input (child process)."""
    import torch

    from gnnst.data.encoders import create_encoder, default_batch_size, resolve_device, set_cpu_threads
    from gnnst.data.encoders.base import PatchEncoder
    from gnnst.data.encoders.recipes import RECIPES, build_network

    set_cpu_threads(threads)
    dev = resolve_device(device)
    if name in RECIPES:  # the architecture with random weights (timm's initialisation)
        r = RECIPES[name]
        enc = PatchEncoder(name=name, model=build_network(r, device="cpu"), input_size=r.input_size, mean=r.mean,
                           std=r.std, dim=r.dim, identity="random")
    else:
        enc = create_encoder(name)
    enc.to(dev, precision)
    b = batch or default_batch_size(dev)
    x = torch.rand(b, 3, enc.input_size, enc.input_size, device=dev).contiguous(memory_format=torch.channels_last)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    enc.embed(x)
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        out = enc.embed(x)
    sync()
    dt = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    return {"encoder": name, "device": str(dev), "precision": enc.precision, "batch": b,
            "patches_per_s": b * n_batches / dt, "first_batch_s": first}


def build_child(config: str | None, overrides: list[str]) -> dict:
    """One cold ``build_graphs`` in this (child) process; stage seconds, CPU seconds, patches."""
    from gnnst.config import load_config
    from gnnst.graph.dataset import build_graphs
    from gnnst.runtime import tune_malloc

    tune_malloc()  # as the command line does
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="gnnst-embed-") as tmp:
        cfg = load_config(config, [f"data.cache_dir={tmp}/cache", *overrides])
        res = build_graphs(cfg, f"{tmp}/out", progress=False)
    t = dict(res.timings)
    t["process"] = time.perf_counter() - t0
    t["cpu"] = _cpu_seconds() - c0
    t["patches"] = res.info["total_nodes"]
    return t


def cut_child(manifest: str, data_root: str, workers: int, resize: bool) -> dict:
    """Patches/s of decoding and cutting alone (no encoder) with ``workers`` processes (child process)."""
    import torch
    from torch.utils.data import DataLoader

    from gnnst import keys
    from gnnst.data.images import probe_image
    from gnnst.data.manifest import load_manifest
    from gnnst.data.patches import PatchPlan, PatchStream, patch_side_px
    from gnnst.data.slides import read_slide

    m = load_manifest(manifest)
    plans = []
    for e in m.select(None):
        a = read_slide(m, e, data_root=data_root, cache_dir=None, download=False)
        meta = a.uns[keys.UNS_GNNST]
        plans.append(PatchPlan.make(e.slide_id, meta[keys.IMAGE_PATH], a.obsm[keys.SPATIAL],
                                    side_px=patch_side_px(150.0, meta[keys.MPP]), out_size=224,
                                    downsamples=probe_image(meta[keys.IMAGE_PATH])[2]))
    stream = PatchStream(plans, rows=64, workers=workers, out_size=224, resize=resize)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    n = 0
    for item in DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None):
        n += len(item["patches"])
    return {"patches": n, "patches_per_s": n / (time.perf_counter() - t0), "cpu": _cpu_seconds() - c0,
            "threads": torch.get_num_threads()}


def bf16_drift(device: str, data_root: str | None, slides: list[str]) -> dict:
    """Default encoder, float32 vs bfloat16, on real patches (child process)."""
    import numpy as np
    import torch

    from gnnst.config import load_config
    from gnnst.data.embeddings import embed_slides
    from gnnst.data.encoders import create_encoder, resolve_device
    from gnnst.data.manifest import load_manifest
    from gnnst.data.slides import read_slide

    dev = resolve_device(device)
    cfg = load_config(REPO / "configs" / "her2st.yaml", [f"data.slides=[{','.join(slides)}]"]
                      + ([f"data.data_root={data_root}"] if data_root else []))
    m = load_manifest(cfg.data.manifest)
    adatas = [read_slide(m, e, data_root=cfg.data.data_root, cache_dir=None, download=False) for e in m.select(cfg.data.slides)]
    enc = create_encoder("efficientnet_lite0")
    out = {}
    for p in ("float32", "bfloat16"):
        enc.to(dev, p)
        out[p] = np.concatenate(embed_slides(adatas, enc, size_um=150.0, device=dev, num_workers=0, progress=False))
    a, b = out["float32"], out["bfloat16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rel = np.abs(a - b).max(1) / np.abs(a).max(1)
    return {"device": str(dev), "patches": len(a), "cosine_min": float(cos.min()), "cosine_median": float(np.median(cos)),
            "max_abs_rel_median": float(np.median(rel)), "max_abs_rel_max": float(rel.max()),
            "rmse_over_std": float(np.sqrt(((a - b) ** 2).mean()) / a.std())}


def write_cohort(root: Path, n_slides: int, n_spots: int, seed: int = 0) -> Path:
    """``n_slides`` legacy-ST slides of ``n_spots`` spots (200 µm pitch, 40 px apart: 5 µm/px), 50 genes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    nx = int(np.ceil(np.sqrt(n_spots)))
    ny = int(np.ceil(n_spots / nx))
    size = (40 * nx + 40, 40 * ny + 40)
    genes = [f"G{g}" for g in range(50)]
    root.mkdir(parents=True, exist_ok=True)
    lines = ["name: cohort", "reader: legacy_st", "scale: {pitch_um: 200}", "slides:"]
    texture = (rng.random((size[1] // 4 + 1, size[0] // 4 + 1, 3)) * 255).astype(np.uint8)
    for s in range(n_slides):
        sid = f"S{s:03d}"
        spots = [(2 + i % nx, 2 + i // nx) for i in range(n_spots)]
        sel = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
        sel += [f"{x}\t{y}\t{x}\t{y}\t{20 + 40 * (x - 2)}\t{20 + 40 * (y - 2)}\t1" for x, y in spots]
        (root / f"{sid}_selection.tsv").write_text("\n".join(sel) + "\n")
        counts = rng.poisson(3.0, size=(n_spots, len(genes)))
        rows = ["\t" + "\t".join(genes)] + [f"{x}x{y}\t" + "\t".join(map(str, c)) for (x, y), c in zip(spots, counts)]
        with gzip.open(root / f"{sid}.tsv.gz", "wt", compresslevel=1) as f:
            f.write("\n".join(rows) + "\n")
        img = Image.fromarray(np.roll(texture, s * 7, axis=1)).resize(size)
        img.save(root / f"{sid}_HE.jpg", quality=85)
        lines += [f"  - slide_id: {sid}", f"    patient_id: P{s % 10}", "    files:",
                  f"      counts: {{path: {sid}.tsv.gz}}", f"      spots: {{path: {sid}_selection.tsv}}",
                  f"      image: {{path: {sid}_HE.jpg}}"]
    (root / "cohort.yaml").write_text("\n".join(lines) + "\n")
    return root / "cohort.yaml"


def write_random_checkpoint(name: str, path: Path) -> None:
    """Random weights in the authors' file layout of recipe ``name`` (for speed only)."""
    import torch

    from gnnst.data.encoders.recipes import RECIPES, build_network, file_layout

    r = RECIPES[name]
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(s, generator=g) - 0.5) * 0.04 for k, s in file_layout(r, build_network(r)).items()}
    if r.files.startswith("model.safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in runs)


def run(args) -> dict:
    dev = args.device
    common = [f"encoder.device={dev}"] + ([f"data.data_root={args.data_root}"] if args.data_root else [])
    her2st = str(REPO / "configs" / "her2st.yaml")
    r: dict = {"loadavg_before": os.getloadavg(), "device_arg": dev}
    # 1. encoder alone
    alone = []
    for name, n_batches in (("efficientnet_lite0", args.batches), (args.fm, args.fm_batches)):
        for precision in ("auto", "float32"):
            runs = [_in_child(encoder_alone, name, dev, precision, args.batch, n_batches, args.threads)
                    for _ in range(args.repeats)]
            row = dict(runs[0])
            row["patches_per_s"] = median_of(runs, "patches_per_s")
            row["first_batch_s"] = median_of(runs, "first_batch_s")
            alone.append(row)
            if row["precision"] == "float32":  # auto is float32 here: nothing to compare
                break
    r["alone"] = alone
    # 2. whole cold builds
    threads = [f"encoder.num_threads={args.threads}"] if args.threads else []
    builds = {"efficientnet_lite0 (her2st-6)": [_in_child(build_child, her2st, common + threads)
                                                for _ in range(args.repeats)]}
    with tempfile.TemporaryDirectory(prefix="gnnst-fm-") as tmp:
        ck = Path(tmp) / ("model.safetensors" if args.fm == "phikon-v2" else "pytorch_model.bin")
        write_random_checkpoint(args.fm, ck)
        fm_over = common + threads + [f"encoder.name={args.fm}", f"encoder.checkpoint={ck}"]
        if args.fm_slides:
            fm_over.append(f"data.slides=[{','.join(args.fm_slides)}]")
        builds[f"{args.fm}, random weights ({'/'.join(args.fm_slides) or 'her2st-6'})"] = [
            _in_child(build_child, her2st, fm_over) for _ in range(args.fm_repeats)]
    r["builds"] = builds
    # 3. bfloat16 drift
    r["drift"] = _in_child(bf16_drift, dev, args.data_root, args.drift_slides)
    # 4. synthetic cohort
    n_slides, n_spots = (int(v) for v in args.cohort.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="gnnst-cohort-") as tmp:
        manifest = write_cohort(Path(tmp) / "data", n_slides, n_spots)
        over = [f"data.data_root={Path(tmp) / 'data'}", f"encoder.device={dev}", "data.download=false", *threads]
        r["cohort"] = {"slides": n_slides, "spots": n_spots, "runs": {
            w: [_in_child(build_child, None, over + [f"data.manifest={manifest}", f"encoder.num_workers={w}"])
                for _ in range(args.repeats)] for w in args.workers}, "cut": {
            w: [_in_child(cut_child, str(manifest), str(Path(tmp) / "data"), w, True)
                for _ in range(args.repeats)] for w in args.workers}}
    r["loadavg_after"] = os.getloadavg()
    return r


def format_tables(r: dict) -> str:
    alone = {(a["encoder"], a["precision"]): a for a in r["alone"]}
    lines = ["**Encoder alone** (random input, fresh process, one warm-up batch):", "",
             "| encoder | device | precision | batch | patches/s | vs float32 | first batch (s) |", "|---|---|---|---|---|---|---|"]
    for a in r["alone"]:
        base = alone.get((a["encoder"], "float32"), a)["patches_per_s"]
        lines.append(f"| {a['encoder']} | {a['device']} | {a['precision']} | {a['batch']} | {a['patches_per_s']:.1f} | "
                     f"{a['patches_per_s'] / base:.2f}x | {a['first_batch_s']:.2f} |")
    lines += ["", "**Whole cold build** (`build_graphs`, fresh process, empty cache):", "",
              "| encoder (slides) | patches | total (s) | patches/s end to end | encode (s) | encode patches/s | "
              "encode vs alone | CPU s | stages (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, runs in r["builds"].items():
        enc = label.split(" ")[0].rstrip(",")
        ref = next((a for a in r["alone"] if a["encoder"] == enc and a["precision"] == r["alone"][0]["precision"]), None)
        ref = ref or next(a for a in r["alone"] if a["encoder"] == enc)
        n, tot, encode = runs[0]["patches"], median_of(runs, "total"), median_of(runs, "encode")
        stages = ", ".join(f"{k} {median_of(runs, k):.2f}" for k in ("read", "model_load", "decode", "crop",
                                                                      "patch_wait", "encode", "panel", "graph"))
        lines.append(f"| {label} | {n} | {tot:.2f} | {n / tot:.1f} | {encode:.2f} | {n / encode:.1f} | "
                     f"{n / encode / ref['patches_per_s']:.0%} | {median_of(runs, 'cpu'):.1f} | {stages} |")
    c = r["cohort"]
    ws = list(c["runs"])
    base = median_of(c["runs"][ws[0]], "total")
    lines += ["", f"**Synthetic cohort**: {c['slides']} slides x {c['spots']} spots (small JPEGs, 5 µm/px, "
              f"150-µm patches), cold build, default encoder:", "",
              "| encoder.num_workers | total (s) | vs first | ideal 1/N | patches/s | encode (s) | patch_wait (s) | "
              "decode+crop worker-s | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    first = next((w for w in ws if w > 0), None)
    for w in ws:
        runs = c["runs"][w]
        tot = median_of(runs, "total")
        ideal = f"{median_of(c['runs'][first], 'total') * first / w / base:.2f}" if w and first else "-"
        lines.append(f"| {w} | {tot:.1f} | {tot / base:.2f} | {ideal} | "
                     f"{runs[0]['patches'] / tot:.1f} | {median_of(runs, 'encode'):.1f} | "
                     f"{median_of(runs, 'patch_wait'):.1f} | "
                     f"{median_of(runs, 'decode') + median_of(runs, 'crop'):.1f} | {median_of(runs, 'cpu'):.1f} |")
    cut = c["cut"]
    cut0 = median_of(cut[ws[0]], "patches_per_s")
    lines += ["", "Decoding and cutting alone (no encoder; 150-µm patches resampled to 224 px as for a CPU encoder): "
              + "; ".join(f"{w} worker(s) {median_of(cut[w], 'patches_per_s'):.0f} patches/s "
                          f"({median_of(cut[w], 'patches_per_s') / cut0:.2f}x)" for w in ws) + "."]
    d = r["drift"]
    lines += ["", f"- bfloat16 vs float32, default encoder, {d['patches']} her2st patches on {d['device']}: "
              f"cosine similarity median {d['cosine_median']:.5f}, min {d['cosine_min']:.5f}; largest per-patch "
              f"deviation median {d['max_abs_rel_median']:.3f}, max {d['max_abs_rel_max']:.3f} of the patch's largest "
              f"value; RMS difference {d['rmse_over_std']:.3f} of the embeddings' standard deviation. Cached apart "
              "from float32 embeddings."]
    lb, la = r["loadavg_before"], r["loadavg_after"]
    lines.append(f"- Load average (1/5/15 min) before {lb[0]:.1f}, {lb[1]:.1f}, {lb[2]:.1f}, after {la[0]:.1f}, "
                 f"{la[1]:.1f}, {la[2]:.1f}; medians over the repeats; CPU s = user + system seconds of the build "
                 "process and its patch workers.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="encoder-alone batch (default: the device's)")
    p.add_argument("--batches", type=int, default=20, help="timed batches of the default encoder")
    p.add_argument("--fm", default="uni", help="foundation-model recipe timed with random weights")
    p.add_argument("--fm-batches", type=int, default=2, help="timed batches of the foundation model")
    p.add_argument("--fm-repeats", type=int, default=1, help="repeats of the foundation-model build")
    p.add_argument("--fm-slides", nargs="*", default=["C3"], help="her2st slides of the foundation-model build "
                   "(none = all six)")
    p.add_argument("--drift-slides", nargs="+", default=["C3", "B4"], help="her2st slides of the bfloat16 drift")
    p.add_argument("--cohort", default="200x2000", help="synthetic cohort SLIDESxSPOTS")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="encoder.num_workers of the cohort builds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--note", default="", help="a remark to record with the tables")
    args = p.parse_args(argv)
    r = run(args)
    text = format_tables(r) + (f"\n- Note: {args.note}" if args.note else "")
    publish("embed", "Patch embedding: encoder alone vs whole build (`benchmarks/embed.py`)", text, r,
            write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
