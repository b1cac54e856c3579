"""``gnnst <command>``: the command line. ``scripts/*.py`` are two-line shims over these ``main``s.

Every command takes ``--config FILE`` (a YAML diff against the defaults) and trailing dotted
overrides (``graph.k=8 train.lr=3e-4``). User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from gnnst.errors import GnnstError
from gnnst.data.encoders import CPU_BATCH_SIZE
from gnnst.outputs import check_output_dir, check_output_file


def setup_logging(out: Path | None, name: str) -> None:
    """Log to stderr and, when ``out`` is given, to ``out/<name>.log`` once the command has checked its
    inputs and created ``out`` (:class:`gnnst.outputs.DeferredFileHandler`; until then the records wait
    in memory, so a command that fails early leaves no file)."""
    from gnnst.outputs import DeferredFileHandler

    root = logging.getLogger("gnnst")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    root.addHandler(sh)
    if out is not None:
        fh = DeferredFileHandler(out, f"{name}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (only what differs from the defaults)")
    p.add_argument("--data-root", default=None, help="folder holding the manifest's files (else $GNNST_DATA_ROOT)")
    p.add_argument("--manifest", default=None, help="dataset manifest (overrides data.manifest)")
    p.add_argument("--cache-dir", default=None, help="download/embedding cache (else $GNNST_CACHE, ~/.cache/gnnst)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. graph.k=8")


def _parser(name: str, main_fn: Callable, *, out: str | None = None, resume: str | None = None,
            overwrite: bool = False, quiet: bool = False, common: bool = False) -> argparse.ArgumentParser:
    """The parser of ``gnnst <name>`` (description: ``main_fn``'s docstring) with the options shared by
    commands: ``--out`` (its help), ``--resume`` (its help), ``--overwrite``, ``--quiet``, and the config
    options."""
    p = argparse.ArgumentParser(prog=f"gnnst {name}", description=main_fn.__doc__)
    if out is not None:
        p.add_argument("--out", required=True, help=out)
    if resume is not None:
        p.add_argument("--resume", action="store_true", help=resume)
    if overwrite:
        p.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (only files gnnst wrote there are removed, once the "
                            "new run's inputs are read and checked)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    if common:
        _common(p)
    return p


def _load(args: argparse.Namespace, base: dict | None = None):
    """The command's config: defaults < ``base`` < ``--config`` < the options and overrides."""
    from gnnst.config import load_config

    over = list(args.overrides)
    if getattr(args, "graphs", None) is not None:
        over.append(f"data.graphs={args.graphs}")
    if args.manifest is not None:
        over.append(f"data.manifest={args.manifest}")
    if args.data_root is not None:
        over.append(f"data.data_root={args.data_root}")
    if args.cache_dir is not None:
        over.append(f"data.cache_dir={args.cache_dir}")
    return load_config(args.config, over, base=base)


def build_graphs_main(argv: Sequence[str] | None = None) -> int:
    """``gnnst build-graphs``: manifest -> ``OUT/<slide_id>.pt`` + ``dataset.json`` + config."""
    p = _parser("build-graphs", build_graphs_main, out="output folder for the graphs", overwrite=True, quiet=True,
                common=True)
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    args = p.parse_args(argv)

    def run() -> int:
        from gnnst.data.sharding import Shard
        from gnnst.graph.dataset import build_graphs

        cfg = _load(args)
        out = check_output_dir(args.out)  # before anything heavy is imported; the run folder's rules: build_graphs
        setup_logging(out if Shard.from_env().is_main else None, "build")  # rank 0 writes the log
        res = build_graphs(cfg, out, progress=not args.quiet, use_cache=not args.no_cache, overwrite=args.overwrite)
        info = res.info
        if info is None:  # a rank other than 0 under torchrun: rank 0 writes and reports
            return 0
        print(f"built {len(info['slides'])} graphs in {out} ({info['total_nodes']} nodes, "
              f"{info['num_genes']} genes, x width {info['embedding_dim']}, {res.timings['total']:.1f} s)")
        for s, v in info["slides"].items():
            print(f"  {s}: {v['nodes']} nodes, {v['edges']} edges, patient {v['patient_id']}, mpp {v['mpp']:.4f}")
        return 0

    return _guard(run)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``gnnst train``: graphs (built from the slides, or a `build-graphs` folder) -> cross-validated model, metrics, predictions."""
    p = _parser("train", train_main, out="output folder (config, log, checkpoints, predictions, metrics)",
                resume="continue an interrupted run in --out (with the same config)", overwrite=True, quiet=True,
                common=True)
    p.add_argument("--graphs", default=None, help="a `gnnst build-graphs` output folder to train from, without "
                                                  "reading the raw slides (= data.graphs)")
    args = p.parse_args(argv)

    def run() -> int:
        from gnnst.eval.crossval import run_crossval
        from gnnst.eval.report import format_summary
        from gnnst.train.distributed import cleanup, init_distributed

        cfg = _load(args)
        if cfg.data.graphs is not None:  # the folder's settings under the run's YAML and overrides
            from gnnst.graph.store import GraphDataset

            cfg = _load(args, base=GraphDataset(cfg.data.graphs).config_base())
        out = check_output_dir(args.out)  # before torch is imported; the run folder's rules: run_crossval
        dist = init_distributed(cfg.train.device, cfg.train.distributed)  # under torchrun, else a no-op
        setup_logging(out if dist.is_main else None, "train")
        try:
            metrics = run_crossval(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
        finally:
            cleanup()
        if dist.is_main:
            print(format_summary(metrics))
            print(f"\nmetrics: {out / 'metrics.json'}; predictions: {out / 'predictions'}")
        return 0

    return _guard(run)


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``gnnst predict``: a trained checkpoint + an unseen slide's image and spots (or a tissue grid) -> .h5ad or .zarr."""
    p = _parser("predict", predict_main, quiet=True)
    p.add_argument("--checkpoint", required=True, help="model.pt (a TrainedModel) written by `gnnst train`: OUT/final/model.pt "
                        "(trained on every slide), or OUT/folds/<fold>/model.pt (the fold's held-out slides never seen)")
    p.add_argument("--image", required=True, help="the slide's full-resolution H&E image")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--spots", help="spot table (CSV/TSV: pixel_x, pixel_y or x, y in pixels)")
    where.add_argument("--grid-um", type=float, help="H&E only: predict on a regular grid of this pitch (µm) "
                                                     "laid over the detected tissue")
    p.add_argument("--grid", choices=("hex", "square"), default="hex", help="grid layout with --grid-um")
    p.add_argument("--supersample", type=int, default=2,
                   help="with --grid-um: each spot is the mean over S x S sub-positions of its cell (S^2 patches "
                        "per spot); 1 = one patch at the spot centre, ~4x faster than the default 2")
    p.add_argument("--plot-genes", default=None,
                   help="with --grid-um: comma-separated genes mapped to <out>_<gene>.png (default: top-3 HEG)")
    p.add_argument("--out", required=True, help="output .h5ad (AnnData), or .zarr (a SpatialData store: the H&E "
                                                "thumbnail, the spots' shapes and the predictions as their table)")
    p.add_argument("--reliable-pcc", type=float, default=None,
                   help="cross-validated PCC a gene needs for var['gnnst_reliable'] (default: the model's "
                        "reliability.reliable_pcc, 0.3 unless trained otherwise)")
    p.add_argument("--mpp", type=float, default=None,
                   help="micrometres per pixel (else from the image metadata, or in spot mode the spot pitch)")
    p.add_argument("--slide-id", default=None, help="slide id (default: image file stem)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (else $GNNST_CACHE, ~/.cache/gnnst)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE,
                   help=f"patches per encoder pass (default {CPU_BATCH_SIZE}, for CPUs; use 64 or more on a GPU)")
    args = p.parse_args(argv)

    def run() -> int:
        from gnnst.inference import predict_grid, write_grid_maps
        from gnnst.predictor import TrainedModel
        from gnnst.reliability import describe_reliability

        out = Path(args.out)
        if out.suffix == ".zarr" and out.exists():
            raise GnnstError(f"--out {out} exists; choose another path (a SpatialData store is never overwritten)")
        if not out.is_dir() and out.suffix not in (".h5ad", ".zarr"):
            raise GnnstError(f"--out must end in .h5ad or .zarr, got {out}")
        out = check_output_file(out, suffix=".zarr" if out.suffix == ".zarr" else ".h5ad")
        if args.reliable_pcc is not None and not -1 <= args.reliable_pcc <= 1:
            raise GnnstError(f"--reliable-pcc must be in [-1, 1], got {args.reliable_pcc}")
        if args.mpp is not None and not args.mpp > 0:
            raise GnnstError(f"--mpp must be > 0, got {args.mpp}")
        if args.batch_size < 1:
            raise GnnstError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.grid_um is None and args.plot_genes is not None:
            raise GnnstError("--plot-genes draws grid maps: use it with --grid-um")
        setup_logging(None, "predict")
        if args.grid_um is None:
            return _predict_spots(args)
        model = TrainedModel.load(args.checkpoint)
        slide_id = args.slide_id or Path(args.image).stem
        genes = model.panel.heg[:3] if args.plot_genes is None else \
            [g.strip() for g in args.plot_genes.split(",") if g.strip()]
        missing = [g for g in genes if g not in model.panel.genes]
        if missing:
            raise GnnstError(f"--plot-genes: gene '{missing[0]}' is not in the panel of {args.checkpoint}")
        adata = predict_grid(model, args.image, grid_um=args.grid_um, kind=args.grid,
                             supersample=args.supersample, slide_id=slide_id, mpp=args.mpp,
                             cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device,
                             progress=not args.quiet, reliable_pcc=args.reliable_pcc)
        write_prediction(adata, out)
        maps = write_grid_maps(adata, genes, out.with_suffix(""))
        print(f"predicted {adata.n_vars} genes at {adata.n_obs} {args.grid} grid spots ({args.grid_um:g} µm) "
              f"over the tissue of '{slide_id}' -> {out}" + (f"; maps: {', '.join(m.name for m in maps)}"
                                                             if maps else ""))
        print(describe_reliability(adata.uns["gnnst"]["reliability"]))
        return 0

    return _guard(run)


def _predict_spots(args: argparse.Namespace) -> int:
    """``gnnst predict --spots``: the image is decoded in a background thread (Pillow and openslide
    release the GIL) while the spot table, torch and the model load."""
    from concurrent.futures import ThreadPoolExecutor

    from gnnst.data.images import open_image
    from gnnst.data.readers.legacy_st import mpp_from_pitch
    from gnnst.graph.edges import check_spot_counts
    from gnnst.inference import predict_slide, read_spot_table
    from gnnst.predictor import TrainedModel
    from gnnst.reliability import describe_reliability

    out = Path(args.out)
    slide_id = args.slide_id or Path(args.image).stem
    with ThreadPoolExecutor(max_workers=1) as pool:
        decoding = pool.submit(open_image, args.image)
        im = None
        try:
            xy, bc, arr = read_spot_table(args.spots, slide_id=slide_id)
            model = TrainedModel.load(args.checkpoint)
            check_spot_counts({f"--spots {args.spots}": len(xy)},
                              [(f"graph.k={model.graph.k} of {args.checkpoint}", model.graph.k)],
                              hint="predict at more spots of the slide (a spot table of the whole tissue, or "
                                   "--grid-um), or with a checkpoint trained with a smaller graph.k")
            im = decoding.result()
            mpp = args.mpp if args.mpp is not None else im.mpp
            if mpp is None and arr is not None and len(arr) >= 3:
                mpp = mpp_from_pitch(arr[:, 0], arr[:, 1], xy, 200.0, barcodes=bc, where=str(args.spots),
                                     remedy="give --mpp")
            if mpp is None:
                raise GnnstError(f"{args.image}: no micrometres per pixel in the image metadata; give --mpp")
            adata = predict_slide(model, args.image, xy, bc, slide_id=slide_id, mpp=mpp, cache_dir=args.cache_dir,
                                  batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                                  opened=im, reliable_pcc=args.reliable_pcc)
        finally:
            if im is None and decoding.exception() is None:  # waits for the decode, then frees it
                im = decoding.result()
            if im is not None:
                im.close()
    write_prediction(adata, out)
    print(f"predicted {adata.n_vars} genes at {adata.n_obs} spots of '{slide_id}' -> {out}")
    print(describe_reliability(adata.uns["gnnst"]["reliability"]))
    return 0


def write_prediction(adata, out: Path) -> None:
    """``gnnst predict``'s output: an .h5ad, or a SpatialData store (:func:`gnnst.export.spatialdata.write_spatialdata`)."""
    if out.suffix == ".zarr":
        from gnnst.export.spatialdata import write_spatialdata

        write_spatialdata(adata, out)
    else:
        from gnnst.io import atomic_write_h5ad

        atomic_write_h5ad(adata, out)


def ablate_main(argv: Sequence[str] | None = None) -> int:
    """``gnnst ablate``: the same cross-validation for each neighbourhood of ``ablation.settings`` -> table + plot."""
    args = _parser("ablate", ablate_main, out="output folder (ablation.csv/.md/.png, settings/<setting>/ runs)",
                   resume="reuse finished settings and folds in --out (with the same config)", overwrite=True,
                   quiet=True, common=True).parse_args(argv)

    def run() -> int:
        from gnnst.eval.ablation import parse_settings, run_ablation

        cfg = _load(args)
        parse_settings(cfg)  # bad settings fail before anything is read or written
        out = check_output_dir(args.out)
        setup_logging(out, "ablate")
        run_ablation(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
        print((out / "ablation.md").read_text())
        print(f"table: {out / 'ablation.csv'}; plot: {out / 'ablation.png'}")
        return 0

    return _guard(run)


def export_main(argv: Sequence[str] | None = None) -> int:
    """``gnnst export``: a train run's held-out slides -> scanpy/squidpy-ready .h5ad (graph, image, predictions)."""
    p = _parser("export", export_main)
    p.add_argument("--run", required=True, help="output folder of `gnnst train`")
    p.add_argument("--out", required=True, help="folder for <slide>.h5ad (or all_slides.h5ad with --concat)")
    p.add_argument("--concat", action="store_true", help="one file, obs['slide_id'], block-diagonal graph")
    p.add_argument("--slides", nargs="+", default=None, help="only these held-out slides")
    p.add_argument("--no-image", action="store_true", help="leave out the H&E (uns['spatial'])")
    p.add_argument("--hires-max-side", type=int, default=2000, help="longer side of the stored H&E in pixels")
    p.add_argument("--spot-diameter-um", type=float, default=None, help="spot diameter (default: half the pitch)")
    args = p.parse_args(argv)

    def run() -> int:
        from gnnst.export.anndata import export_run

        check_output_dir(args.out)
        setup_logging(None, "export")
        paths = export_run(args.run, args.out, slides=args.slides, concat=args.concat, image=not args.no_image,
                           max_side=args.hires_max_side, spot_diameter_um=args.spot_diameter_um)
        for path in paths:
            print(f"wrote {path}")
        return 0

    return _guard(run)


def plot_main(argv: Sequence[str] | None = None) -> int:
    """``gnnst plot``: figures of a train run (maps over the H&E, per-gene PCC, Moran's I) as PNG."""
    p = _parser("plot", plot_main)
    p.add_argument("--run", required=True, help="output folder of `gnnst train`")
    p.add_argument("--out", default=None, help="folder for the PNGs (default RUN/figures)")
    p.add_argument("--slides", nargs="+", default=None, help="maps for these held-out slides only")
    p.add_argument("--no-image", action="store_true", help="maps without the H&E")
    args = p.parse_args(argv)

    def run() -> int:
        from gnnst.eval.figures import plot_run

        check_output_dir(Path(args.run) / "figures" if args.out is None else args.out)
        setup_logging(None, "plot")
        for path in plot_run(args.run, out=args.out, slides=args.slides, image=not args.no_image):
            print(f"wrote {path}")
        return 0

    return _guard(run)


def _guard(fn: Callable[[], int]) -> int:
    """Run ``fn``; a :class:`GnnstError` becomes one line on stderr and exit status 2."""
    from gnnst.runtime import tune_malloc

    tune_malloc()  # every command: large blocks stay in the heap (see gnnst.runtime)
    try:
        return fn()
    except GnnstError as e:
        print(f"gnnst: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gnnst: interrupted", file=sys.stderr)
        return 130


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "build-graphs": build_graphs_main,
    "train": train_main,
    "predict": predict_main,
    "ablate": ablate_main,
    "export": export_main,
    "plot": plot_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``gnnst <command> [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gnnst <command> [options]\n\ncommands:")
        for name, fn in COMMANDS.items():
            print(f"  {name:14s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from gnnst import __version__

        print(f"gnnst {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"gnnst: error: unknown command '{argv[0]}' (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


def run_and_exit(command: Callable[[Sequence[str] | None], int] = main) -> None:
    """Entry point of the ``gnnst`` executable, ``python -m gnnst`` and ``scripts/*.py``: run ``command``
    on ``sys.argv[1:]``, flush, and leave without the interpreter's teardown.

    Outputs are complete when a command returns (files are written to a temporary name and renamed,
    logs are flushed here), and tearing down torch, PyG and anndata took ~1.2 s per process on the
    2-core CPU: a fifth of ``gnnst predict`` on a 284-spot slide. ``os._exit`` skips it. From Python,
    call the ``*_main`` functions, which return an exit status instead.
    """
    import os
    import warnings

    # PyG still decorates functions with torch.jit.script, which torch flags as deprecated when PyG is
    # imported: a notice to PyG, printed at every command, that a gnnst user can do nothing about
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    try:
        code = command(sys.argv[1:])
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run_and_exit()
